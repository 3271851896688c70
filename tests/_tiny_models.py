"""Tiny random transformers models built in memory from configs (no files, no downloads), seeded.

Shared by the tests that use PEFT as an oracle; import after `sys.path.insert(0, tests_dir)`.
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def llama(tie_word_embeddings: bool = False) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 32, GQA 4/2 heads, vocab 100) in eval mode; lm_head tied to embed_tokens if asked."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(cfg).eval()


def gpt2() -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (n_embd 32, 4 heads, vocab 100; Conv1D projections) in eval mode."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).eval()
