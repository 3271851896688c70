"""Fused elementwise ops of a frozen decoder block: RMSNorm, SwiGLU and RoPE, each one autograd Function.

    rms_norm:  y = w · (x · rsqrt(mean(x²) + eps))           (in fp32, cast back: transformers' LlamaRMSNorm)
    swiglu:    y = silu(gate) · up = gate · σ(gate) · up       (LlamaMLP's act_fn(gate_proj(x)) * up_proj(x))
    rotary:    y = x · cos + rotate_half(x) · sin            (apply_rotary_pos_emb, unsqueeze_dim=1)

Eager autograd of transformers' code keeps a tensor per op and runs one kernel per op in backward. These keep
only what the backward cannot recompute cheaply (RMSNorm: x and the per-row rstd, not the normalised copy;
SwiGLU: gate and up, not silu(gate), recomputed; RoPE: only cos and sin) and write each gradient in a few
in-place passes.
Same values as transformers' code (fp32: to rounding; bf16: same casts). Pure torch: CPU and CUDA, traced by
torch.compile like any autograd Function, plain ops under no_grad / inference_mode.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


class _RMSNorm(torch.autograd.Function):
    """y = w · (x · rstd).to(x.dtype), rstd = rsqrt(mean(x²) + eps) per row, computed in fp32."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        xf = x.to(torch.float32)
        dx = dw = None
        if ctx.needs_input_grad[1]:  # frozen models skip this: the norm weight does not train
            y = (xf * rstd).to(x.dtype)
            dw = (g * y).reshape(-1, y.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            dy = (g * weight).to(torch.float32)
            # dx = rstd·dy − x·rstd³·mean(dy·x): one reduction, then two in-place passes over a fresh tensor
            coef = (dy * xf).mean(-1, keepdim=True).mul_(rstd.pow(3))
            dx = dy.mul_(rstd).addcmul_(xf, coef, value=-1).to(x.dtype)  # dy is fresh: g·w is a new tensor
        return dx, dw, None


class _SwiGLU(torch.autograd.Function):
    """y = silu(gate) · up; the backward recomputes silu(gate) instead of keeping it."""

    @staticmethod
    def forward(ctx: Any, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None]:
        gate, up = ctx.saved_tensors
        # four passes (eager autograd: three, but it keeps silu(gate)); torch's fused silu_backward kernel
        # computes g·up·σ(gate)·(1 + gate·(1 − σ(gate))) in one pass, in place over the fresh g·up
        dup = F.silu(gate).mul_(g) if ctx.needs_input_grad[1] else None
        dgate = None
        if ctx.needs_input_grad[0]:
            gu = g * up
            dgate = torch.ops.aten.silu_backward.grad_input(gu, gate, grad_input=gu)
        return dgate, dup


class _Rotary(torch.autograd.Function):
    """y = x · cos + rotate_half(x) · sin over the last dim, rotate_half(x) = cat(−x₂, x₁); saves cos and sin."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        h = x.shape[-1] // 2
        y = x * cos
        y[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)  # first half: x₁cos₁ − x₂sin₁
        y[..., h:].addcmul_(x[..., :h], sin[..., h:])  # second half: x₂cos₂ + x₁sin₂
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        h = g.shape[-1] // 2
        # the transpose of the rotation: dx₁ = g₁cos₁ + g₂sin₂, dx₂ = g₂cos₂ − g₁sin₁
        dx = g * cos
        dx[..., :h].addcmul_(g[..., h:], sin[..., h:])
        dx[..., h:].addcmul_(g[..., :h], sin[..., :h], value=-1)
        return dx, None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim as transformers' LlamaRMSNorm computes it: in fp32, cast back, times `weight`.

    Args:
        x: (..., d) activations, any float dtype.
        weight: (d,) scale.
        eps: added to the mean square before the rsqrt.

    Returns:
        `weight * (x · rsqrt(mean(x²) + eps)).to(x.dtype)` (the dtype torch promotes weight and x to).

    Examples:
        >>> x = torch.tensor([[3.0, 4.0]])
        >>> rms_norm(x, torch.ones(2), 0.0)
        tensor([[0.8485, 1.1314]])
    """
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    return _RMSNorm.apply(x, weight, eps)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) · up: the SwiGLU of a Llama MLP, between its gate/up and down projections.

    Examples:
        >>> swiglu(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0]))
        tensor([0.0000, 1.4621])
    """
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate shape {tuple(gate.shape)} differs from up shape {tuple(up.shape)}")
    return _SwiGLU.apply(gate, up)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """Rotary position embedding of q and k: transformers' `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`.

    Args:
        q: (batch, heads, seq, head_dim) queries.
        k: (batch, kv_heads, seq, head_dim) keys.
        cos: (batch, seq, head_dim) cosines (the model's rotary embedding).
        sin: (batch, seq, head_dim) sines.
        unsqueeze_dim: where cos and sin get the heads' dim (2 for q, k laid out (batch, seq, heads, head_dim)).

    Returns:
        (q · cos + rotate_half(q) · sin, k · cos + rotate_half(k) · sin).

    Examples:
        >>> q = k = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
        >>> cos, sin = torch.zeros(1, 1, 2), torch.ones(1, 1, 2)   # a quarter turn
        >>> rotary(q, k, cos, sin)[0].flatten()
        tensor([0., 1.])
    """
    if cos.shape != sin.shape or cos.shape[-1] != q.shape[-1] or q.shape[-1] % 2:
        raise ValueError(
            f"rotary: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both end in q's even head_dim "
            f"{q.shape[-1]}"
        )
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)  # broadcast over heads
    return _Rotary.apply(q, cos, sin), _Rotary.apply(k, cos, sin)
