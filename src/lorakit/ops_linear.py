"""The LoRA linear fast path: `lora_linear`, a custom autograd Function over the base's own GEMM.

    y = base(x) + scaling · (dropout(x) Aᵀ) Bᵀ      A: (r, d_in)   B: (d_out, r)

Part of the math (`lorakit.ops` re-exports its public functions); the naive formula it is tested
against is `ops.lora_linear_reference`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

# how a quantised base's stored weight becomes a plain tensor (`bases.QuantizedBase.decode`); None: a plain weight
if TYPE_CHECKING:  # a type only: the module holds functions and constants, no other module-level objects
    Decode = Callable[[Tensor, torch.dtype | None], Tensor]

# Costs per layer (N tokens): the base is 2·N·d_in·d_out FLOPs forward and again for the input gradient;
# LoRA adds rank-r GEMMs that are memory-bound on CPU, so the fast path is about passes over N-sized
# tensors: scale at rank r, accumulate into the base output, never keep a dropped copy of x, and, for
# fp32 without dropout, fold the branch into the weight where that is the smaller pass: x (W + s·B A)ᵀ
# instead of accumulating s·h Bᵀ into y (N×d_out) when N > d_in, and gy (W + s·B A) instead of adding
# dh A into dx (N×d_in) when N > d_out. Forward and backward decide apart: h = x Aᵀ and dh = gy B are
# needed for B's and A's gradients whichever way, so each fold only replaces one N-sized accumulate
# (for a 512→1376 projection at N = 1024 the forward folds and the backward does not).
#
# Dropout: every call of every layer draws its own mask from torch's default generator, as the LoRA paper
# and PEFT do, and nothing outlives the call. So gradient checkpointing, which replays the generator's
# state when it recomputes a forward, redraws the very masks of the first pass (either mode), threads and
# models never see each other's draws, and torch.compile traces the draw like any other op.

_DROP_BITS = 16  # dropout probability resolution: masks come from 16-bit lanes of 64-bit random words


def dropout_keep(shape: tuple[int, ...], p: float, device: torch.device | str | None = None) -> tuple[Tensor, float]:
    """A bool keep-mask for dropout with probability p, and the 1/(1-p) scale that keeps it unbiased.

    Four mask entries per 64 random bits (each 16-bit lane compared to a threshold): ~2× cheaper than
    `torch.rand` + compare on CPU. p is realised to 1/65536 (0.1 -> 0.1000061); the returned scale is
    1/(1 - realised p), so E[keep·scale] = 1 exactly. Draws from torch's default generator (seedable).

    Examples:
        >>> keep, scale = dropout_keep((2, 3), 0.5)
        >>> keep.dtype, keep.shape, scale
        (torch.bool, torch.Size([2, 3]), 2.0)
    """
    n = math.prod(shape)
    cut = min(round(p * 2**_DROP_BITS), 2**_DROP_BITS - 1)  # lanes below the cut are dropped
    # randint over the whole int64 range draws the words Tensor.random_(-2**63, 2**63 - 1) would (same
    # generator, same stream), and torch.compile traces it, which it does not do for random_ with bounds
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    lanes = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    return lanes >= cut - 2**15, 2**_DROP_BITS / (2**_DROP_BITS - cut)


@dataclass(frozen=True)
class GemmPlan:
    """How the LoRA linear lays out its rank-r GEMMs and when it folds the branch into the weight: speed and the
    last bits of rounding, never the math. `lora_linear` uses `gemm_plan()` unless a call passes its own.

    Attributes:
        rank_r: "wide" gives each rank-r product an output whose contiguous (vectorised) dimension is the long one,
            tokens or d: h = (A xᵀ)ᵀ, dh = (Bᵀ gyᵀ)ᵀ, dB = (hᵀ gy)ᵀ; "narrow" the direct x Aᵀ, gy B, gyᵀ h (r there).
        fold: "auto" folds s·B A into the weight where that weight-sized pass is smaller than the N-sized pass it
            replaces; "never"; "always" wherever folding is exact enough (fp32/fp64, no dropout).

    Examples:
        >>> GemmPlan(rank_r="narrow", fold="never")
        GemmPlan(rank_r='narrow', fold='never')
    """

    rank_r: str = "wide"
    fold: str = "auto"

    def __post_init__(self) -> None:
        if self.rank_r not in ("wide", "narrow"):
            raise ValueError(f"GemmPlan.rank_r must be 'wide' or 'narrow', got {self.rank_r!r}")
        if self.fold not in ("auto", "never", "always"):
            raise ValueError(f"GemmPlan.fold must be 'auto', 'never' or 'always', got {self.fold!r}")


def gemm_plan() -> GemmPlan:
    """The `GemmPlan` `lora_linear` uses when a call passes none: one rule for every CPU, never a timing, so a run
    and its resumption compute the same bits. Why it holds on AVX2 and AVX-512: benchmarks/RESULTS-cpu-choices.md.

    Examples:
        >>> gemm_plan()
        GemmPlan(rank_r='wide', fold='auto')
    """
    return GemmPlan()  # made per call: the module holds no objects (tests/test_dropout.py)


def _rank_r(a: Tensor, m: Tensor, wide: bool) -> Tensor:
    """a mᵀ (N, r) for a (N, k) and a rank-r factor m (r, k): h = x Aᵀ, dh = gy B (m = Bᵀ).

    wide (`GemmPlan.rank_r`): computed as (m aᵀ)ᵀ, a transposed view of an (r, N) result, so the GEMM vectorises
    over the N tokens. The same products (another kernel may sum them in another order); every consumer takes
    the view as is (BLAS transposes by flag).
    """
    return (m @ a.t()).t() if wide else a @ m.t()


def _grad_B(h: Tensor, gy: Tensor, wide: bool) -> Tensor:
    """dB = gyᵀ h (d_out, r), unscaled: wide as (hᵀ gy)ᵀ, vectorised over d_out (`GemmPlan.rank_r`)."""
    return (h.t() @ gy).t() if wide else gy.t() @ h


def _as_mask(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """keep (bool) as 0/1 in `dtype`: multiplying by it is ~2× faster than by a bool tensor (no mixed dtypes)."""
    return keep.view(torch.uint8).to(dtype)


def _fold_pays(lora_elems: int, d_in: int, d_out: int, dtype: torch.dtype, mode: str = "auto") -> bool:
    """Whether to form W + s·B A (a weight-sized pass) instead of the N-sized LoRA passes (`lora_elems`).

    Only in fp32/fp64: in bf16/fp16 the sum would round the update onto the weight's coarse grid. "auto"
    (`GemmPlan.fold`) compares element counts: both sides are rank-r GEMMs (inner dimension r) writing a long
    contiguous output, memory-bound alike on any ISA, so the counts rank their costs on AVX2 and AVX-512 alike.
    """
    if mode == "never" or dtype not in (torch.float32, torch.float64):
        return False
    return mode == "always" or lora_elems > d_in * d_out


def decode_weight(weight: Tensor, dtype: torch.dtype | None = None, decode: Decode | None = None) -> Tensor:
    """The weight operand as a plain tensor in `dtype`: a quantised base's stored tensor through its format's
    `decode` (`bases.linear_operand`), a plain one cast. Called where the LoRA linear uses W, so autograd saves
    the stored form."""
    if decode is not None:
        return decode(weight, dtype)
    return weight if dtype is None else weight.to(dtype)


def base_linear(x: Tensor, weight: Tensor, bias: Tensor | None, fan_in_fan_out: bool = False) -> Tensor:
    """The base layer's own GEMM, so that B = 0 reproduces its output bit for bit on any CPU (every linear
    path computes its base term here: LoRA, mixed batches, DoRA).

    nn.Linear computes F.linear(x, W, b). transformers' Conv1D computes addmm(b, x, W_stored) on its weight
    stored (d_in, d_out), of which `weight` (d_out, d_in) is the transposed view. Same math, but the two
    GEMM calls round differently on some CPUs (AMD EPYC), so each base gets its own.
    """
    if not fan_in_fan_out:
        return F.linear(x, weight, bias)  # (..., d_out)
    x2 = x.reshape(-1, x.shape[-1])  # (N, d_in), Conv1D's x.view(-1, d_in)
    y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())  # weight.t(): the stored tensor
    return y.view(*x.shape[:-1], weight.shape[0])


def _folded(weight: Tensor, A: Tensor, B: Tensor, scaling: float, fan_in_fan_out: bool) -> Tensor:
    """W + s·B A (d_out, d_in), laid out in memory as the base lays out W, so `base_linear` runs W's GEMM on it."""
    if fan_in_fan_out:
        return torch.addmm(weight.t(), A.t(), B.t(), alpha=scaling).t()  # formed (d_in, d_out), as Conv1D stores W
    return torch.addmm(weight, B, A, alpha=scaling)


def _forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    keep: Tensor | None,
    scaling: float,
    drop_scale: float,
    fan_in_fan_out: bool,
    fold: bool,
    need_h: bool,
    decode: Decode | None = None,
    wide: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """(y (..., d_out), h = drop(x) Aᵀ (N, r) or None): the forward of both the autograd and the no-grad path.

    One function for both, so a reentrant checkpoint's no-grad first pass and its recompute agree bit for bit.
    """
    x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
    weight = decode_weight(weight, x.dtype, decode)
    if fold:  # one GEMM on W + s·B A, as if merged; h only for B's gradient
        y = base_linear(x, _folded(weight, A, B, scaling, fan_in_fan_out), bias, fan_in_fan_out)
        return y, (_rank_r(x2, A, wide) if need_h else None)
    dropped = x2 if keep is None else x2 * _as_mask(keep, x2.dtype)  # (N, d_in), unscaled: scaled at rank r
    h = _rank_r(dropped, A, wide)  # (N, r)
    if keep is not None:
        h.mul_(drop_scale)
    y = base_linear(x, weight, bias, fan_in_fan_out)  # (..., d_out)
    y.view(-1, y.shape[-1]).addmm_(h, B.t(), alpha=scaling)  # += s·h Bᵀ in place: no output-sized temporary
    return y, h


class _LoraLinearFn(torch.autograd.Function):
    """y = base(x) + s·(drop(x) Aᵀ) Bᵀ with a hand-written backward; the mask `keep` is drawn by the caller.

    `fold` is the forward's choice; the backward makes its own (`_fold_backward`), knowing which gradients it owes.

    Saves x, h = drop(x) Aᵀ (N×r) and, with dropout, the bool keep-mask (1 byte/element): never a dropped
    copy of x. The frozen weight and bias get gradients only if they ask for one. Under create_graph=True
    the backward runs in plain autograd ops (h recomputed from x and A), so second derivatives are exact.
    """

    # forward(ctx, ...) rather than setup_context: the latter binds the signature on every call (~36 µs per
    # layer here), and torch.func never reaches this Function (lora_linear runs `_composite` under it)
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, keep, scaling, drop_scale, fan_in_fan_out, fold, decode, wide, fold_mode):
        y, h = _forward(x, weight, bias, A, B, keep, scaling, drop_scale, fan_in_fan_out, fold, True, decode, wide)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, A, B, h, keep)
        ctx.scaling, ctx.drop_scale, ctx.fan_in_fan_out, ctx.decode = scaling, drop_scale, fan_in_fan_out, decode
        ctx.has_bias, ctx.wide, ctx.fold_mode = bias is not None, wide, fold_mode
        return y

    @staticmethod
    def backward(ctx, gy):
        if gy is None:
            return (None,) * 13
        x, weight, A, B, h, keep = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradients must themselves be differentiable
            grads = _backward_differentiable(ctx, gy, x, weight, A, B, keep)
        else:
            grads = _backward(ctx, gy, x, weight, A, B, h, keep)
        return (*grads, *(None,) * 8)  # keep, scaling, drop_scale, fan_in_fan_out, fold, decode, wide, fold_mode


def _backward(
    ctx, gy: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor, h: Tensor, keep: Tensor | None
) -> tuple[Tensor | None, ...]:
    """(dx, dW, db, dA, dB), each only if asked for: both scales at rank r, the mask applied once."""
    s = ctx.scaling
    x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
    gy2 = gy.reshape(-1, gy.shape[-1])  # (N, d_out)
    need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    dx = dw = db = dA = dB = None
    mask = _as_mask(keep, x2.dtype) if keep is not None and (need_x or need_A) else None
    n, d_in, d_out = x2.shape[0], x2.shape[1], gy2.shape[1]
    fold = need_x and keep is None and _fold_backward(n, d_in, d_out, x2.dtype, need_A, ctx.fold_mode)
    dh = None
    if need_A or (need_x and not fold):
        dh = _rank_r(gy2, B.t(), ctx.wide)  # (N, r) = gy B
        dh.mul_(s * ctx.drop_scale)  # both scales at rank r
    if need_x:
        w = decode_weight(weight, x2.dtype, ctx.decode)
        if fold:  # base and LoRA in one GEMM, on the weight laid out as the base's
            dx = gy2 @ _folded(w, A, B, s, ctx.fan_in_fan_out)  # (N, d_in)
        else:
            assert dh is not None  # computed above for need_x without fold
            dx = gy2 @ w  # (N, d_in): what autograd of the base's GEMM computes (w: (d_out, d_in) as the base has it)
            if mask is None:
                dx.addmm_(dh, A)
            else:
                dx.addcmul_(dh @ A, mask)  # the mask's scale is already in dh
        dx = dx.view(x.shape)
    if need_A:
        assert dh is not None  # computed above for need_A
        dA = dh.t() @ (x2 if mask is None else x2 * mask)  # (r, d_in)
    if need_B:
        dB = _grad_B(h, gy2, ctx.wide).mul_(s)  # (d_out, r)
    if need_w:
        dw = gy2.t() @ x2  # (d_out, d_in)
    if need_b and ctx.has_bias:
        db = gy2.sum(0)
    return dx, dw, db, dA, dB


def _fold_backward(n: int, d_in: int, d_out: int, dtype: torch.dtype, need_A: bool, mode: str = "auto") -> bool:
    """Whether the input gradient folds: it saves dh A (N×d_in), plus dh = gy B (N×d_out) where A's gradient
    does not need dh anyway."""
    return _fold_pays(n * d_in if need_A else n * (d_in + d_out), d_in, d_out, dtype, mode)


def _backward_differentiable(
    ctx, gy: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor, keep: Tensor | None
) -> tuple[Tensor | None, ...]:
    """The same gradients in plain autograd ops on the saved inputs, for double backward (create_graph=True)."""
    s = ctx.scaling
    x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
    gy2 = gy.reshape(-1, gy.shape[-1])  # (N, d_out)
    mask = None if keep is None else _as_mask(keep, x2.dtype) * ctx.drop_scale  # (N, d_in)
    dropped = x2 if mask is None else x2 * mask  # (N, d_in)
    dh = (gy2 @ B) * s  # (N, r)
    need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    dx = dw = db = dA = dB = None
    if need_x:
        dx_lora = dh @ A if mask is None else (dh @ A) * mask  # (N, d_in)
        dx = (gy2 @ decode_weight(weight, x2.dtype, ctx.decode) + dx_lora).view(x.shape)
    if need_A:
        dA = dh.t() @ dropped  # (r, d_in)
    if need_B:
        dB = s * (gy2.t() @ (dropped @ A.t()))  # (d_out, r)
    if need_w:
        dw = gy2.t() @ x2
    if need_b and ctx.has_bias:
        db = gy2.sum(0)
    return dx, dw, db, dA, dB


def _functional_transform(*tensors: Tensor | None) -> bool:
    """Whether torch.func (grad, vmap, jvp, ...) or forward-mode AD is at work on this call.

    The custom Function has no vmap or jvp rule, so these run `_composite`, the formula in plain autograd ops.
    """
    if torch._C._are_functorch_transforms_active():
        return True
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _composite(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    keep: Tensor | None,
    scaling: float,
    drop_scale: float,
    fan_in_fan_out: bool,
    decode: Decode | None,
) -> Tensor:
    """The formula in plain differentiable ops, with the mask the fast path would use."""
    dropped = x if keep is None else x * keep.view(x.shape).to(x.dtype) * drop_scale  # (..., d_in)
    w = decode_weight(weight, x.dtype, decode)
    return base_linear(x, w, bias, fan_in_fan_out) + scaling * ((dropped @ A.t()) @ B.t())


def _savable(x: Tensor) -> Tensor:
    """x, or a normal copy of an inference tensor (made under torch.inference_mode): autograd cannot save those.

    (dynamo does not trace `is_inference`; a compiled graph takes its inputs as normal tensors anyway)
    """
    return x.clone() if not torch.compiler.is_compiling() and x.is_inference() else x


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
    fan_in_fan_out: bool = False,
    decode: Decode | None = None,
    plan: GemmPlan | None = None,
) -> Tensor:
    """The LoRA linear forward: base(x) + scaling · (dropout(x) Aᵀ) Bᵀ.

    Args:
        x: (..., d_in) input.
        weight: the base weight as (d_out, d_in), as nn.Linear holds it, or a quantised base's stored tensor.
        bias: the base bias (d_out,) or None.
        A, B: the factors, (r, d_in) and (d_out, r).
        scaling: alpha / r (or alpha / sqrt(r)).
        dropout, training: with both, this call draws its own mask from torch's default generator.
        fan_in_fan_out: the base is transformers' Conv1D, `weight` the transposed view of its stored
            (d_in, d_out) tensor; the base term is then computed as Conv1D computes it.
        decode: for a quantised `weight`, its format's decode (`bases.linear_operand`); None for a plain one.
        plan: the GEMM layout and fold policy; None: `gemm_plan()`. Changes speed and rounding, not the math.

    Examples:
        >>> x, W, A, B = torch.randn(5, 4), torch.randn(3, 4), torch.randn(2, 4), torch.zeros(3, 2)
        >>> torch.equal(lora_linear(x, W, None, A, B, 2.0), F.linear(x, W))
        True
    """
    if torch.is_autocast_enabled(x.device.type):  # autocast skips in-place ops and custom Functions: cast here, once
        dt = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(
                x.to(dt),
                weight if decode is not None else weight.to(dt),
                None if bias is None else bias.to(dt),
                A.to(dt),
                B.to(dt),
                scaling,
                dropout,
                training,
                fan_in_fan_out,
                decode,
                plan,
            )
    n, d_in, d_out = math.prod(x.shape[:-1]), x.shape[-1], weight.shape[0]
    keep, drop_scale = dropout_keep((n, d_in), dropout, x.device) if dropout > 0.0 and training else (None, 1.0)
    if _functional_transform(x, weight, bias, A, B):
        return _composite(x, weight, bias, A, B, keep, scaling, drop_scale, fan_in_fan_out, decode)
    plan = gemm_plan() if plan is None else plan
    wide, mode = plan.rank_r == "wide", plan.fold
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, A, B)):
        fold = keep is None and _fold_pays(n * d_out, d_in, d_out, x.dtype, mode)  # h = x Aᵀ is computed either way
        args = (_savable(x), weight, bias, A, B, keep, scaling, drop_scale, fan_in_fan_out, fold, decode, wide, mode)
        return _LoraLinearFn.apply(*args)
    fold = keep is None and _fold_pays(n * (d_in + d_out), d_in, d_out, x.dtype, mode)  # inference: no h to keep
    return _forward(x, weight, bias, A, B, keep, scaling, drop_scale, fan_in_fan_out, fold, False, decode, wide)[0]
