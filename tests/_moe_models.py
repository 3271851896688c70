"""Tiny random mixture-of-experts transformers models built in memory from configs (no files), seeded, fp32, eval.

Three families whose experts are fused 3-D parameters (transformers v5 `use_experts_implementation` modules):
Qwen3-MoE and Mixtral store `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) and compute F.linear(x, W[e]);
gpt-oss stores them transposed, (E, H, 2I) and (E, I, H), with biases and an interleaved, clamped gate.
No expert weight is square (a swapped in/out shows); every dimension is a multiple of 4 so transformers'
default CPU `grouped_mm` runs. 2 layers, 4 experts, top-2.
Import after `sys.path.insert(0, tests_dir)`.
"""

from __future__ import annotations

import torch
from torch import nn

HIDDEN, EXPERT_FF, VOCAB = 16, 12, 64  # 2·EXPERT_FF != HIDDEN: no expert weight is square


def init_experts_(model: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Fill every experts module's 3-D weights and 2-D biases with seeded N(0, std), so experts differ.

    The models' own init draws them with std 0.02 (gpt-oss zeros its biases): too small on a hidden size of 16
    for LoRA on the experts to move the logits visibly.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not hasattr(module, "num_experts") or not hasattr(module, "down_proj"):
                continue
            for p in module.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _finish(model: nn.Module) -> nn.Module:
    return init_experts_(model).float().eval()


def tiny_qwen3_moe() -> nn.Module:
    """A 2-layer Qwen3-MoE causal LM (hidden 16, 4 experts, top-2, moe_intermediate 12, vocab 64)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=EXPERT_FF,
        moe_intermediate_size=EXPERT_FF,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        max_position_embeddings=64,
        norm_topk_prob=True,
    )
    return _finish(Qwen3MoeForCausalLM(cfg))


def tiny_mixtral() -> nn.Module:
    """A 2-layer Mixtral causal LM (hidden 16, 4 experts, top-2, intermediate 12, vocab 64)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=EXPERT_FF,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return _finish(MixtralForCausalLM(cfg))


def tiny_gpt_oss() -> nn.Module:
    """A 2-layer gpt-oss causal LM (hidden 16, 4 experts, top-2, intermediate 12, vocab 64; transposed experts
    with biases)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=EXPERT_FF,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return _finish(GptOssForCausalLM(cfg))


BUILDERS = {"qwen3_moe": tiny_qwen3_moe, "mixtral": tiny_mixtral, "gpt_oss": tiny_gpt_oss}
