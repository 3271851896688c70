"""The LoRA math, as functions: init, forward (with a custom autograd for linear layers), merge delta.

    y = base(x) + scaling * B(A(dropout(x)))      A: (r, d_in)   B: (d_out, r)
    merge:  W' = W + scaling * B @ A              (fp32, checked finite, cast back)

Everything else in lorakit calls these; nothing else does LoRA arithmetic, but for the variants, whose
math sits beside their layers (lorakit.variants.dora, lorakit.variants.base_init). The LoRA linear fast
path (custom autograd, dropout masks, folding) is `ops_linear.py`; its public functions are re-exported here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import BASE_CHANGING_INITS, INITS
from .errors import LoraMergeError
from .ops_linear import GemmPlan, _savable, base_linear, decode_weight, dropout_keep, gemm_plan, lora_linear

__all__ = [
    "GemmPlan",
    "base_linear",
    "decode_weight",
    "delta_weight",
    "dropout_keep",
    "gemm_plan",
    "init_factors_",
    "lora_conv",
    "lora_conv_composed",
    "lora_conv_mixed",
    "lora_embedding",
    "lora_embedding_composed",
    "lora_embedding_mixed",
    "lora_linear",
    "lora_linear_mixed",
    "lora_linear_reference",
    "merged_low_rank",
    "merged_weight",
    "mixed_rows",
    "weighted_rows",
]


def init_factors_(A: Tensor, B: Tensor, init: str) -> None:
    """Initialise A (r, d_in, ...) in place and zero B, so a fresh layer computes exactly its base."""
    with torch.no_grad():
        if init == "kaiming":  # what torch.nn.Linear does to its weight (and PEFT's default)
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif init == "gaussian":  # PEFT's "gaussian": std 1/r
            torch.nn.init.normal_(A, std=1.0 / A.shape[0])
        elif init in BASE_CHANGING_INITS:  # filled from the base weight (lorakit.variants.base_init)
            A.zero_()
        else:
            raise ValueError(f"unknown init {init!r}: expected one of {', '.join(map(repr, INITS))}")
        B.zero_()


def delta_weight(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """scaling * B @ A in fp32, shaped like a conv/linear weight (d_out, d_in, *kernel)."""
    r = A.shape[0]
    Bs = B.reshape(B.shape[0], r).float() * scaling  # scale at rank r: (d_out, r), not (d_out, d_in)
    return (Bs @ A.reshape(r, -1).float()).reshape(B.shape[0], *A.shape[1:])


def merged_weight(weight: Tensor, delta: Tensor, name: str = "weight") -> Tensor:
    """weight + delta computed in fp32, refused if not finite, returned in weight's dtype.

    `delta` (fp32, from `delta_weight`) is consumed: the sum is formed in its buffer.
    """
    return _finite(delta.add_(weight), weight.dtype, name)  # fp32 (+ a bf16/fp16 weight promotes), in delta's buffer


def merged_low_rank(weight: Tensor, m1: Tensor, m2: Tensor, scaling: float, name: str = "weight") -> Tensor:
    """weight + scaling · m1 @ m2 as one fp32 addmm (no separate delta, scale or add passes), checked finite.

    For a linear weight (d_out, d_in) pass (B, A); for one stored (d_in, d_out) pass (Aᵀ, Bᵀ). A 3-D weight
    (experts, ., .) with 3-D factors takes one batched addmm (baddbmm), expert by expert.
    """
    mm = torch.baddbmm if weight.dim() == 3 else torch.addmm
    return _finite(mm(weight.float(), m1.float(), m2.float(), alpha=scaling), weight.dtype, name)


def _finite(merged: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    lo, hi = torch.aminmax(merged)  # one pass; NaN or Inf anywhere shows up in min or max
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise LoraMergeError(f"merging into {name} gives non-finite values (inf/nan); the weight was not changed")
    return merged.to(dtype)


def lora_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    scaling: float,
    keep: Tensor | None = None,
    drop_scale: float = 1.0,
) -> Tensor:
    """The formula written naively; with `keep` (from `dropout_keep`), the branch reads x·keep·drop_scale.

    The fast path is tested against it, outputs and gradients.
    """
    x_lora = x if keep is None else x * keep.view(x.shape) * drop_scale
    return F.linear(x, weight, bias) + scaling * ((x_lora @ A.t()) @ B.t())


def lora_embedding(ids: Tensor, emb: torch.nn.Embedding, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """Embedding lookup plus s · (A-columns looked up) Bᵀ.  A: (r, num_embeddings), B: (dim, r) as PEFT."""
    y = emb(ids)  # (..., dim)
    h = F.embedding(ids, A.t(), emb.padding_idx)  # (..., r)
    return y + scaling * (h @ B.t())


def lora_conv(
    x: Tensor,
    conv: torch.nn.modules.conv._ConvNd,
    A: Tensor,
    B: Tensor,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Conv plus s · conv1x1_B(conv_A(drop(x))); A has the base's kernel/stride/padding, B is 1×1."""
    y = conv(x)  # (N, d_out, *spatial)
    if dropout > 0.0 and training:
        x_lora = F.dropout(x, dropout, True)  # this call's own mask, from torch's default generator
    else:
        x_lora = _savable(x) if torch.is_grad_enabled() else x
    h = conv._conv_forward(x_lora, A, None)  # (N, r, *spatial)
    r = A.shape[0]
    h = torch.einsum("or,nr...->no...", B.reshape(B.shape[0], r), h)  # 1×1 conv with B
    return y + scaling * h


# -- mixed-adapter batches: row b of the batch uses adapter slots[b] -----------------------------------
# A: (n, r, d_in, ...) and B: (n, d_out, r) stacked over adapters, zero-padded to the largest rank, with each
# adapter's scaling folded into B; slot 0 is all zeros (rows that use no adapter). Batched gathers and bmm:
# no Python loop over adapters or rows.
# A row may also run a weighted composition Σ_k w_k s_k B_k A_k (`lorakit.composition`): then slots and weights
# are (batch, K) and a row's K gathered pairs are concatenated along the rank, w_k folded into B_k, exactly what
# combine_adapters(method="cat") builds for that row (padding: slot 0 at weight 0, zeros).


def mixed_rows(A: Tensor, B: Tensor, slots: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Each row's own factors, gathered once per mixed batch: Aᵀ (batch, d_in, r) and Bᵀ (batch, r, d_out); with
    (batch, K) slots and weights, each row's K pairs concatenated: Aᵀ (batch, d_in, K·r), Bᵀ (batch, K·r, d_out)."""
    if weights is None:
        return A[slots].transpose(1, 2), B[slots].transpose(1, 2)
    rows, K = slots.shape
    At = A[slots].reshape(rows, K * A.shape[1], A.shape[2]).transpose(1, 2)  # (batch, d_in, K·r)
    return At, weighted_rows(B, slots, weights).transpose(1, 2)


def weighted_rows(B: Tensor, slots: Tensor, weights: Tensor) -> Tensor:
    """Each row's K B factors weighted and concatenated along the rank: (batch, d_out, K·r) from B (n, d_out, r)
    and (batch, K) slots and weights (in B's dtype), in the order `slots[b]` lists them (combine's "cat")."""
    rows, K = slots.shape
    Bw = B[slots] * weights[:, :, None, None]  # (batch, K, d_out, r)
    return Bw.permute(0, 2, 1, 3).reshape(rows, B.shape[1], K * B.shape[2])


def lora_linear_mixed(
    x: Tensor, weight: Tensor, bias: Tensor | None, At: Tensor, Bt: Tensor, fan_in_fan_out: bool = False
) -> Tensor:
    """base(x) + per-row (x Aᵀ_row) Bᵀ_row.  x: (batch, ..., d_in); At, Bt from `mixed_rows`.

    The base term is the base's own GEMM (`base_linear`), so a row with no adapter (slot 0, zeros) or a
    fresh one (B = 0) is the base bit for bit, Conv1D included.
    """
    y = base_linear(x, weight, bias, fan_in_fan_out)  # (batch, ..., d_out)
    xb = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, T, d_in)
    h = torch.bmm(xb, At)  # (batch, T, r)
    y.view(x.shape[0], -1, y.shape[-1]).baddbmm_(h, Bt)  # in place: no output-sized temporary
    return y


def lora_embedding_mixed(ids: Tensor, emb: torch.nn.Embedding, A: Tensor, B: Tensor, slots: Tensor) -> Tensor:
    """Embedding + per-row looked-up A columns times Bᵀ.  A: (n, r, num_embeddings), B: (n, dim, r); with (batch, K)
    slots (compositions) B is `weighted_rows`' (batch, dim, K·r) and `lora_embedding_composed` runs."""
    if slots.dim() == 2:
        return lora_embedding_composed(ids, emb, A, B, slots)
    y = emb(ids)  # (batch, T, dim)
    idb = ids.reshape(ids.shape[0], -1)  # (batch, T)
    h = A.transpose(1, 2)[slots[:, None], idb]  # (batch, T, r)
    return y + torch.bmm(h, B[slots].transpose(1, 2)).view(y.shape)


def lora_embedding_composed(ids: Tensor, emb: torch.nn.Embedding, A: Tensor, Bw: Tensor, slots: Tensor) -> Tensor:
    """Embedding + per-row weighted sum of adapters.  A: (n, r, num_embeddings), Bw (batch, dim, K·r) from
    `weighted_rows`, slots (batch, K)."""
    y = emb(ids)  # (batch, T, dim)
    rows, K = slots.shape
    idb = ids.reshape(rows, -1)  # (batch, T)
    h = A.transpose(1, 2)[slots[:, :, None], idb[:, None, :]]  # (batch, K, T, r)
    h = h.permute(0, 2, 1, 3).reshape(rows, idb.shape[1], -1)  # (batch, T, K·r)
    return y + torch.bmm(h, Bw.transpose(1, 2)).view(y.shape)


def lora_conv_mixed(x: Tensor, conv: torch.nn.modules.conv._ConvNd, A: Tensor, B: Tensor, slots: Tensor) -> Tensor:
    """Conv + per-row 1×1_B(conv_A(x)): every adapter's A runs as one conv with n·r channels, rows pick theirs.
    With (batch, K) slots (compositions) B is `weighted_rows`' (batch, d_out, K·r) and `lora_conv_composed` runs."""
    if slots.dim() == 2:
        return lora_conv_composed(x, conv, A, B, slots)
    n, r = A.shape[:2]
    y = conv(x)  # (batch, d_out, *spatial)
    h = conv._conv_forward(x, A.reshape(n * r, *A.shape[2:]), None)  # (batch, n·r, *spatial)
    h = h.view(x.shape[0], n, r, *h.shape[2:])[torch.arange(x.shape[0], device=x.device), slots]  # (batch, r, ...)
    return y + torch.einsum("bor,br...->bo...", B[slots], h)


def lora_conv_composed(x: Tensor, conv: torch.nn.modules.conv._ConvNd, A: Tensor, Bw: Tensor, slots: Tensor) -> Tensor:
    """Conv + per-row weighted sum of adapters: every adapter's A as one conv, each row's K picked and concatenated.
    A: (n, r, d_in, *k), Bw (batch, d_out, K·r) from `weighted_rows`, slots (batch, K)."""
    n, r = A.shape[:2]
    rows, K = slots.shape
    y = conv(x)  # (batch, d_out, *spatial)
    h = conv._conv_forward(x, A.reshape(n * r, *A.shape[2:]), None)  # (batch, n·r, *spatial)
    h = h.view(rows, n, r, *h.shape[2:])[torch.arange(rows, device=x.device)[:, None], slots]  # (batch, K, r, ...)
    return y + torch.einsum("bor,br...->bo...", Bw, h.reshape(rows, K * r, *h.shape[3:]))
