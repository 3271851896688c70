"""The LoRA math, as functions: init, forward (with a custom autograd for linear layers), merge delta.

    y = base(x) + scaling * B(A(dropout(x)))      A: (r, d_in)   B: (d_out, r)
    merge:  W' = W + scaling * B @ A              (fp32, checked finite, cast back)

Everything else in lorakit calls these; nothing else does LoRA arithmetic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import LoraMergeError


def init_factors_(A: Tensor, B: Tensor, init: str) -> None:
    """Initialise A (r, d_in, ...) in place and zero B, so a fresh layer computes exactly its base."""
    with torch.no_grad():
        if init == "kaiming":  # what torch.nn.Linear does to its weight (and PEFT's default)
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif init == "gaussian":  # PEFT's "gaussian": std 1/r
            torch.nn.init.normal_(A, std=1.0 / A.shape[0])
        else:
            raise ValueError(f"unknown init {init!r}: expected 'kaiming' or 'gaussian'")
        B.zero_()


def delta_weight(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """scaling * B @ A in fp32, shaped like a conv/linear weight (d_out, d_in, *kernel)."""
    r = A.shape[0]
    delta = B.reshape(B.shape[0], r).float() @ A.reshape(r, -1).float()  # (d_out, d_in * prod(kernel))
    return delta.mul_(scaling).reshape(B.shape[0], *A.shape[1:])


def merged_weight(weight: Tensor, delta: Tensor, name: str = "weight") -> Tensor:
    """weight + delta computed in fp32, refused if not finite, returned in weight's dtype."""
    merged = weight.float() + delta
    if not torch.isfinite(merged).all():
        raise LoraMergeError(f"merging into {name} gives non-finite values (inf/nan); the weight was not changed")
    return merged.to(weight.dtype)


class _LoraLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ, with one addmm into the base output.

    Saves x, h = drop(x) Aᵀ (N×r) and, with dropout, a bool keep-mask: never a dropped copy of x.
    The frozen weight gets no gradient unless it asks for one.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling, p, training):
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
        y = F.linear(x2, weight, bias)  # (N, d_out)
        keep = None
        if p > 0.0 and training:
            keep = torch.rand_like(x2) >= p  # (N, d_in) bool
            h = (x2 * keep) @ A.t()  # (N, r)
            h.mul_(1.0 / (1.0 - p))
        else:
            h = x2 @ A.t()  # (N, r)
        y.addmm_(h, B.t(), alpha=scaling)  # (N, d_out) += s · h Bᵀ, no output-sized temporary
        ctx.save_for_backward(x2, weight, A, B, h, keep)
        ctx.scaling, ctx.p, ctx.x_shape, ctx.has_bias = scaling, p, x.shape, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, weight, A, B, h, keep = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        gy2 = gy.reshape(-1, gy.shape[-1])  # (N, d_out)
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        dx = dw = db = dA = dB = None
        dh = (gy2 @ B).mul_(s) if (need_x or need_A) else None  # (N, r), scaled at rank r
        if need_x:
            dx = gy2 @ weight  # (N, d_in)
            if keep is None:
                dx.addmm_(dh, A)
            else:
                dx.add_((dh @ A).mul_(keep), alpha=1.0 / (1.0 - p))
        if need_A:
            xd = x2 if keep is None else x2 * keep
            dA = dh.t() @ xd  # (r, d_in)
            if keep is not None:
                dA.mul_(1.0 / (1.0 - p))
        if need_B:
            dB = (gy2.t() @ h).mul_(s)  # (d_out, r)
        if need_w:
            dw = gy2.t() @ x2
        if need_b and ctx.has_bias:
            db = gy2.sum(0)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, dA, dB, None, None, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                scaling: float, dropout: float = 0.0, training: bool = False) -> Tensor:
    """The LoRA linear forward. `weight` is (d_out, d_in) as in nn.Linear (pass Conv1D's weight transposed)."""
    if not torch.is_grad_enabled():  # inference: same math, no autograd bookkeeping
        if dropout > 0.0 and training:
            x_lora = F.dropout(x, dropout, True)
        else:
            x_lora = x
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, weight, bias)  # (N, d_out)
        y.addmm_(x_lora.reshape(-1, x.shape[-1]) @ A.t(), B.t(), alpha=scaling)
        return y.view(*x.shape[:-1], y.shape[-1])
    return _LoraLinearFn.apply(x, weight, bias, A, B, scaling, dropout, training)


def lora_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                          scaling: float) -> Tensor:
    """The formula written naively (no dropout); the fast path is tested against it."""
    return F.linear(x, weight, bias) + scaling * ((x @ A.t()) @ B.t())


def lora_embedding(ids: Tensor, emb: torch.nn.Embedding, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """Embedding lookup plus s · (A-columns looked up) Bᵀ.  A: (r, num_embeddings), B: (dim, r) as PEFT."""
    y = emb(ids)  # (..., dim)
    h = F.embedding(ids, A.t(), emb.padding_idx)  # (..., r)
    return y + scaling * (h @ B.t())


def lora_conv(x: Tensor, conv: torch.nn.modules.conv._ConvNd, A: Tensor, B: Tensor, scaling: float,
              dropout: float = 0.0, training: bool = False) -> Tensor:
    """Conv plus s · conv1x1_B(conv_A(drop(x))); A has the base's kernel/stride/padding, B is 1×1."""
    y = conv(x)  # (N, d_out, *spatial)
    x_lora = F.dropout(x, dropout, True) if dropout > 0.0 and training else x
    h = conv._conv_forward(x_lora, A, None)  # (N, r, *spatial)
    r = A.shape[0]
    h = torch.einsum("or,nr...->no...", B.reshape(B.shape[0], r), h)  # 1×1 conv with B
    return y + scaling * h
