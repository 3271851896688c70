"""The LoRA math, as functions: init, forward (with a custom autograd for linear layers), merge delta.

    y = base(x) + scaling * B(A(dropout(x)))      A: (r, d_in)   B: (d_out, r)
    merge:  W' = W + scaling * B @ A              (fp32, checked finite, cast back)

Everything else in lorakit calls these; nothing else does LoRA arithmetic, but for the variants, whose
math sits beside their layers (lorakit.variants.dora, lorakit.variants.base_init).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import BASE_CHANGING_INITS, INITS
from .errors import LoraMergeError


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

    For a linear weight (d_out, d_in) pass (B, A); for one stored (d_in, d_out) pass (Aᵀ, Bᵀ).
    """
    return _finite(torch.addmm(weight.float(), m1.float(), m2.float(), alpha=scaling), weight.dtype, name)


def _finite(merged: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    lo, hi = torch.aminmax(merged)  # one pass; NaN or Inf anywhere shows up in min or max
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise LoraMergeError(f"merging into {name} gives non-finite values (inf/nan); the weight was not changed")
    return merged.to(dtype)


# -- the LoRA linear fast path ------------------------------------------------------------------------
# Costs per layer (N tokens): the base is 2·N·d_in·d_out FLOPs forward and again for the input gradient;
# LoRA adds rank-r GEMMs that are memory-bound on CPU, so the fast path is about passes over N-sized
# tensors: scale at rank r, accumulate into the base output, never keep a dropped copy of x, and, for
# fp32 without dropout once N is large, fold the branch into the weight: x (W + s·B A)ᵀ is one GEMM and
# the input gradient gy (W + s·B A) another, with no N-sized LoRA pass at all.

_DROP_BITS = 16  # dropout probability resolution: masks come from 16-bit lanes of 64-bit random words


def dropout_keep(shape: tuple[int, ...], p: float, device: torch.device | str | None = None) -> tuple[Tensor, float]:
    """A bool keep-mask for dropout with probability p, and the 1/(1-p) scale that keeps it unbiased.

    Four mask entries per 64 random bits (each 16-bit lane compared to a threshold): ~4× cheaper than
    `torch.rand` + compare on CPU. p is realised to 1/65536 (0.1 -> 0.1000061); the returned scale is
    1/(1 - realised p), so E[keep·scale] = 1 exactly. Draws from torch's default generator (seedable).
    """
    n = math.prod(shape)
    cut = min(round(p * 2**_DROP_BITS), 2**_DROP_BITS - 1)  # lanes below the cut are dropped
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, 2**63 - 1)
    lanes = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    return lanes >= cut - 2**15, 2**_DROP_BITS / (2**_DROP_BITS - cut)


class _SiblingDropout:
    """The dropout last drawn for an input tensor, shared by the sibling layers that read the same x.

    q/k/v (and gate/up) take one input; drawing one mask and one dropped input for all of them saves
    two of three draws, multiplies and stored masks — as if dropout were applied once to the block's
    LoRA input. A layer that reads the same x again (a repeated call) gets a fresh draw. A weak
    reference and the tensor's version counter make sure the mask is only reused for that very x.
    """

    def __init__(self) -> None:
        self.ref: weakref.ref | None = None
        self.version, self.p, self.users = -1, -1.0, set()
        self.keep: Tensor | None = None
        self.dropped: Tensor | None = None
        self.scale = 1.0

    def get(self, x: Tensor, x2: Tensor, p: float, user: int) -> tuple[Tensor, Tensor, float]:
        """(keep mask, x2 · mask, 1/(1-p)) for layer `user` reading `x` (viewed as x2: (N, d_in))."""
        if (self.ref is not None and self.ref() is x and self.version == x._version and self.p == p
                and user not in self.users and not torch.compiler.is_compiling()):
            self.users.add(user)
            return self.keep, self.dropped, self.scale
        keep, scale = dropout_keep(x2.shape, p, x2.device)
        dropped = x2 * _as_mask(keep, x2.dtype)  # (N, d_in), unscaled: the scale is applied at rank r
        if not torch.compiler.is_compiling():
            self.ref, self.version, self.p, self.users = weakref.ref(x), x._version, p, {user}
            self.keep, self.dropped, self.scale = keep, dropped, scale
        return keep, dropped, scale


_sibling_dropout = _SiblingDropout()


def _as_mask(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """keep (bool) as 0/1 in `dtype`: multiplying by it is ~2× faster than by a bool tensor (no mixed dtypes)."""
    return keep.view(torch.uint8).to(dtype)


def _merge_pays(n: int, d_in: int, d_out: int, dtype: torch.dtype, passes: int = 1) -> bool:
    """Whether forming W + s·B A (a weight-sized pass, `passes` times) beats the N-sized LoRA passes.

    Only in fp32/fp64: in bf16/fp16 the sum would round the update onto the weight's coarse grid.
    """
    return dtype in (torch.float32, torch.float64) and n * (d_in + d_out) > passes * d_in * d_out


def is_quantized(weight: Tensor) -> bool:
    """Whether `weight` is a quantised base weight that `dense` dequantises (packed int8 or torchao NF4)."""
    return weight.dtype == torch.int8 or hasattr(weight, "get_original_weight")


def dense(weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The weight as a plain tensor in `dtype`: a quantised base (lorakit.quant) is dequantised, others cast.

    Packed int8 is (d_out, d_in + 4) with each row's fp32 absmax scale in its last 4 bytes; an NF4Tensor
    (torchao) dequantises itself. Called where the LoRA linear uses W, so autograd saves the quantised form.
    """
    if weight.dtype == torch.int8:
        scale = weight[:, -4:].contiguous().view(torch.float32)  # (d_out, 1)
        return weight[:, :-4] * scale.to(dtype or torch.float32)  # int8 · scale promotes to the scale's dtype
    if hasattr(weight, "get_original_weight"):  # torchao's NF4Tensor
        weight = weight.get_original_weight()
    return weight if dtype is None else weight.to(dtype)


class _LoraLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ  with hand-written backward.

    Saves x, h = drop(x) Aᵀ (N×r) and, with dropout, a bool keep-mask (1 byte/element): never a dropped
    copy of x. The frozen weight and bias get gradients only if they ask for one.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling, p, training):
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
        wq, weight = weight, dense(weight, x2.dtype)  # a quantised base: saved quantised, dequantised again in backward
        n, (d_out, d_in) = x2.shape[0], weight.shape
        keep, drop_scale, merge = None, 1.0, False
        if p > 0.0 and training:
            keep, dropped, drop_scale = _sibling_dropout.get(x, x2, p, id(A))  # (N, d_in) bool, shared by siblings
            h = dropped @ A.t()  # (N, r)
            h.mul_(drop_scale)
            y = F.linear(x2, weight, bias)  # (N, d_out)
            y.addmm_(h, B.t(), alpha=scaling)  # += s·h Bᵀ in place: no output-sized temporary
        else:
            h = x2 @ A.t()  # (N, r)
            merge = _merge_pays(n, d_in, d_out, x2.dtype, passes=2)  # formed again for the input gradient
            if merge:
                y = F.linear(x2, torch.addmm(weight, B, A, alpha=scaling), bias)
            else:
                y = F.linear(x2, weight, bias)
                y.addmm_(h, B.t(), alpha=scaling)
        ctx.save_for_backward(x2, wq, A, B, h, keep)
        ctx.scaling, ctx.drop_scale, ctx.merge, ctx.has_bias = scaling, drop_scale, merge, bias is not None
        return y.view(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, gy):
        x2, weight, A, B, h, keep = ctx.saved_tensors
        s = ctx.scaling
        gy2 = gy.reshape(-1, gy.shape[-1])  # (N, d_out)
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        dx = dw = db = dA = dB = None
        mask = _as_mask(keep, x2.dtype) if keep is not None and (need_x or need_A) else None
        dh = None
        if need_A or (need_x and not ctx.merge):
            dh = gy2 @ B  # (N, r)
            dh.mul_(s * ctx.drop_scale)  # both scales at rank r
        if need_x:
            weight = dense(weight, x2.dtype)
            if ctx.merge:
                dx = gy2 @ torch.addmm(weight, B, A, alpha=s)  # (N, d_in): base and LoRA in one GEMM
            else:
                dx = gy2 @ weight  # (N, d_in)
                if mask is None:
                    dx.addmm_(dh, A)
                else:
                    dx.addcmul_(dh @ A, mask)  # the mask's scale is already in dh
            dx = dx.view(*gy.shape[:-1], x2.shape[-1])
        if need_A:
            dA = dh.t() @ (x2 if mask is None else x2 * mask)  # (r, d_in)
        if need_B:
            dB = (h.t() @ gy2).t().mul_(s)  # (d_out, r); hᵀ·gy is ~2× faster than gyᵀ·h here
        if need_w:
            dw = gy2.t() @ x2
        if need_b and ctx.has_bias:
            db = gy2.sum(0)
        return dx, dw, db, dA, dB, None, None, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                scaling: float, dropout: float = 0.0, training: bool = False) -> Tensor:
    """The LoRA linear forward. `weight` is (d_out, d_in) as in nn.Linear (pass Conv1D's weight transposed)."""
    if torch.is_autocast_enabled(x.device.type):  # autocast skips in-place ops and custom Functions: cast here, once
        dt = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(x.to(dt), weight if is_quantized(weight) else weight.to(dt), None if bias is None else bias.to(dt), A.to(dt), B.to(dt),
                               scaling, dropout, training)
    if torch.is_grad_enabled():
        return _LoraLinearFn.apply(x, weight, bias, A, B, scaling, dropout, training)
    # inference: the same math without autograd bookkeeping
    x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
    weight = dense(weight, x2.dtype)
    d_out, d_in = weight.shape
    if dropout > 0.0 and training:
        keep, drop_scale = dropout_keep(x2.shape, dropout, x2.device)
        y = F.linear(x2, weight, bias)
        y.addmm_((x2 * _as_mask(keep, x2.dtype)) @ A.t(), B.t(), alpha=scaling * drop_scale)
    elif _merge_pays(x2.shape[0], d_in, d_out, x2.dtype):
        y = F.linear(x2, torch.addmm(weight, B, A, alpha=scaling), bias)  # one GEMM, as if merged
    else:
        y = F.linear(x2, weight, bias)  # (N, d_out)
        y.addmm_(x2 @ A.t(), B.t(), alpha=scaling)
    return y.view(*x.shape[:-1], d_out)


def lora_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                          scaling: float, keep: Tensor | None = None, drop_scale: float = 1.0) -> Tensor:
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


def lora_conv(x: Tensor, conv: torch.nn.modules.conv._ConvNd, A: Tensor, B: Tensor, scaling: float,
              dropout: float = 0.0, training: bool = False) -> Tensor:
    """Conv plus s · conv1x1_B(conv_A(drop(x))); A has the base's kernel/stride/padding, B is 1×1."""
    y = conv(x)  # (N, d_out, *spatial)
    x_lora = F.dropout(x, dropout, True) if dropout > 0.0 and training else x
    h = conv._conv_forward(x_lora, A, None)  # (N, r, *spatial)
    r = A.shape[0]
    h = torch.einsum("or,nr...->no...", B.reshape(B.shape[0], r), h)  # 1×1 conv with B
    return y + scaling * h


# -- mixed-adapter batches: row b of the batch uses adapter slots[b] -----------------------------------
# A: (n, r, d_in, ...) and B: (n, d_out, r) stacked over adapters, zero-padded to the largest rank, with each
# adapter's scaling folded into B; slot 0 is all zeros (rows that use no adapter). Batched gathers and bmm:
# no Python loop over adapters.

def mixed_rows(A: Tensor, B: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's own factors, gathered once per mixed batch: Aᵀ (batch, d_in, r) and Bᵀ (batch, r, d_out)."""
    return A[slots].transpose(1, 2), B[slots].transpose(1, 2)


def lora_linear_mixed(x: Tensor, weight: Tensor, bias: Tensor | None, At: Tensor, Bt: Tensor) -> Tensor:
    """F.linear(x, W, b) + per-row (x Aᵀ_row) Bᵀ_row.  x: (batch, ..., d_in); At, Bt from `mixed_rows`."""
    y = F.linear(x, weight, bias)  # (batch, ..., d_out)
    xb = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, T, d_in)
    h = torch.bmm(xb, At)  # (batch, T, r)
    y.view(x.shape[0], -1, y.shape[-1]).baddbmm_(h, Bt)  # in place: no output-sized temporary
    return y


def lora_embedding_mixed(ids: Tensor, emb: torch.nn.Embedding, A: Tensor, B: Tensor, slots: Tensor) -> Tensor:
    """Embedding + per-row looked-up A columns times Bᵀ.  A: (n, r, num_embeddings), B: (n, dim, r)."""
    y = emb(ids)  # (batch, T, dim)
    idb = ids.reshape(ids.shape[0], -1)  # (batch, T)
    h = A.transpose(1, 2)[slots[:, None], idb]  # (batch, T, r)
    return y + torch.bmm(h, B[slots].transpose(1, 2)).view(y.shape)


def lora_conv_mixed(x: Tensor, conv: torch.nn.modules.conv._ConvNd, A: Tensor, B: Tensor, slots: Tensor) -> Tensor:
    """Conv + per-row 1×1_B(conv_A(x)): every adapter's A runs as one conv with n·r channels, rows pick theirs."""
    n, r = A.shape[:2]
    y = conv(x)  # (batch, d_out, *spatial)
    h = conv._conv_forward(x, A.reshape(n * r, *A.shape[2:]), None)  # (batch, n·r, *spatial)
    h = h.view(x.shape[0], n, r, *h.shape[2:])[torch.arange(x.shape[0], device=x.device), slots]  # (batch, r, ...)
    return y + torch.einsum("bor,br...->bo...", B[slots], h)
