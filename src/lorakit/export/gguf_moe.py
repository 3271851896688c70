"""A mixture-of-experts model's experts as llama.cpp's stacked `ffn_{gate,up,down}_exps` tensors, and its MoE keys.

llama.cpp keeps each layer's experts as one 3-D tensor per projection (`src/llama-model.cpp`: `ffn_gate_exps`
`{n_embd, n_ff_exp, n_expert}`, `ffn_up_exps` the same, `ffn_down_exps` `{n_ff_exp, n_embd, n_expert}`, i.e. numpy
(E, I, H), (E, I, H), (E, H, I)) and the router as `ffn_gate_inp` (E, H), which gguf's TensorNameMap names. A
transformers v5 model computes with fused experts (`mlp.experts.gate_up_proj` (E, 2I, H), the gate half first as
`_apply_gate`'s `chunk(2)` reads it, and `down_proj` (E, H, I)), but `save_pretrained` writes the checkpoint's own
per-expert 2-D weights (Qwen3-MoE `mlp.experts.{e}.{gate,up,down}_proj.weight`; Mixtral
`block_sparse_moe.experts.{e}.w1/w3/w2.weight`): both are read here and give the same stacked tensors.

llama.cpp always renormalises the top-k router weights (`build_moe_ffn(..., norm_w = true, ...)` in
`src/models/qwen3moe.cpp` and the llama builder), and the qwen3moe graph makes every layer MoE; a config that
computes otherwise (Qwen3-MoE `norm_topk_prob: false`, dense layers via `mlp_only_layers`/`decoder_sparse_step`)
is refused rather than written as another model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from .gguf_adapter import GgufExportError

_LAYER = r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\."
PER_EXPERT = re.compile(_LAYER + r"(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight")
FUSED = re.compile(_LAYER + r"(gate_up_proj|down_proj)")
PROJECTION = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def expert_counts(hparams: dict[str, Any]) -> tuple[int, int]:
    """(experts, experts used per token) from config.json: Qwen3-MoE's `num_experts` or Mixtral's
    `num_local_experts`, and `num_experts_per_tok`."""
    return int(hparams.get("num_experts") or hparams["num_local_experts"]), int(hparams["num_experts_per_tok"])


def check_moe(hparams: dict[str, Any], where: Path) -> None:
    """GgufExportError for an MoE config llama.cpp's graph would compute differently (see the module docstring)."""
    if hparams.get("norm_topk_prob") is False:
        raise GgufExportError(
            f"{where}: norm_topk_prob=false: llama.cpp's qwen3moe graph always renormalises the top-k router "
            "weights (build_moe_ffn with norm_w = true), so the GGUF would compute another model"
        )
    dense = hparams.get("mlp_only_layers") or []
    step = int(hparams.get("decoder_sparse_step") or 1)
    if dense or step != 1:
        raise GgufExportError(
            f"{where}: mlp_only_layers={dense}, decoder_sparse_step={step}: some layers are dense, but llama.cpp's "
            "qwen3moe graph reads experts in every layer; lorakit exports all-MoE Qwen3-MoE models only"
        )
    if hparams.get("shared_expert_intermediate_size"):
        raise GgufExportError(f"{where}: a shared expert: not in llama.cpp's qwen3moe or llama graphs")


def write_moe_params(writer: Any, hparams: dict[str, Any]) -> None:
    """The expert keys convert_hf_to_gguf.py writes (`{arch}.expert_count`, `.expert_used_count`, and for
    Qwen3-MoE `.expert_feed_forward_length`; Mixtral's experts are `feed_forward_length` wide)."""
    experts, used = expert_counts(hparams)
    writer.add_expert_count(experts)
    writer.add_expert_used_count(used)
    if hparams.get("moe_intermediate_size"):
        writer.add_expert_feed_forward_length(int(hparams["moe_intermediate_size"]))


def pop_expert_tensors(state: dict[str, Tensor], n_experts: int, where: Path) -> dict[str, np.ndarray]:
    """Remove every expert weight from `state`; return them as {`blk.N.ffn_{gate,up,down}_exps.weight`: (E, out, in)}.

    GgufExportError when a layer's experts are not all there (0..n_experts-1) or are not all one shape.
    """
    stacks: dict[tuple[int, str], dict[int, Tensor]] = {}
    for key in [k for k in state if PER_EXPERT.fullmatch(k) or FUSED.fullmatch(k)]:
        t = state.pop(key)
        if m := PER_EXPERT.fullmatch(key):
            stacks.setdefault((int(m[1]), PROJECTION[m[3]]), {})[int(m[2])] = t
            continue
        m = FUSED.fullmatch(key)
        assert m is not None
        if m[2] == "down_proj":
            _fused(stacks, (int(m[1]), "down"), t, n_experts, key, where)
        else:  # (E, 2I, H): the gate's I rows, then the up projection's
            gate, up = t.chunk(2, dim=1)
            _fused(stacks, (int(m[1]), "gate"), gate, n_experts, key, where)
            _fused(stacks, (int(m[1]), "up"), up, n_experts, key, where)
    return {
        f"blk.{layer}.ffn_{proj}_exps.weight": _stack(experts, n_experts, layer, proj, where)
        for (layer, proj), experts in sorted(stacks.items())
    }


def _fused(
    stacks: dict[tuple[int, str], dict[int, Tensor]],
    at: tuple[int, str],
    t: Tensor,
    n_experts: int,
    key: str,
    where: Path,
) -> None:
    """Put a fused (E, out, in) tensor's experts in `stacks[at]`; GgufExportError unless it has `n_experts`."""
    if t.dim() != 3 or t.shape[0] != n_experts:
        raise GgufExportError(f"{where}: {key!r} has shape {tuple(t.shape)}, expected ({n_experts}, out, in)")
    stacks.setdefault(at, {}).update(enumerate(t.unbind(0)))


def _stack(experts: dict[int, Tensor], n_experts: int, layer: int, proj: str, where: Path) -> np.ndarray:
    """The (E, out, in) float32 stack of one layer's projection, every expert checked present and one shape."""
    missing = sorted(set(range(n_experts)) - set(experts))
    extra = sorted(set(experts) - set(range(n_experts)))
    if missing or extra:
        raise GgufExportError(
            f"{where}: layer {layer} {proj} projection: experts {missing or extra} "
            f"{'missing' if missing else 'beyond'} the config's {n_experts} experts"
        )
    shapes = {tuple(t.shape) for t in experts.values()}
    if len(shapes) != 1:
        raise GgufExportError(f"{where}: layer {layer} {proj} projection: experts of shapes {sorted(shapes)}")
    return np.stack([experts[e].float().numpy() for e in range(n_experts)])
