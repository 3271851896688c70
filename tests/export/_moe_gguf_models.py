"""Tiny random Qwen3-MoE and Mixtral checkpoints with a byte-level BPE tokenizer, saved as transformers saves them.

Routers get a larger init than transformers' (std 0.02) so each token's top-k experts are chosen by clear margins
(a near-tie would let a last-bit difference between llama.cpp and torch pick another expert), and experts too, so
what they add moves the logits far beyond the proof's tolerance (a swapped gate and up would fail the proof).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # pytest imports this file for its doctests before any test here
from test_gguf_model import bpe_tokenizer  # noqa: E402

EXPERTS, TOP_K = 4, 2


def _config(family, vocab):
    from transformers import MixtralConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=TOP_K,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if family == "qwen3_moe":  # head_dim 16 != hidden / heads: key_length is read from head_dim
        return Qwen3MoeConfig(
            **common,
            head_dim=16,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_experts=EXPERTS,
            norm_topk_prob=True,
        )
    return MixtralConfig(**common, intermediate_size=16, num_local_experts=EXPERTS)


def save_bpe_moe(family, directory):
    """Save a tiny seeded `family` ("qwen3_moe" or "mixtral") model and its tokenizer to `directory`."""
    from transformers import AutoModelForCausalLM

    fast = bpe_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family, len(fast)))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
            layer.mlp.experts.gate_up_proj.normal_(0, 0.3)
            layer.mlp.experts.down_proj.normal_(0, 0.3)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return Path(directory)
