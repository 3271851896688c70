"""DoRA: weight-decomposed LoRA (Liu et al. 2024, arXiv:2402.09353), its own layer class beside LoraLinear.

    y = (m / ‖W + s·B A‖_row) ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b       m: (d_out,) trainable magnitude
    merge:  W' = (m / ‖W + s·B A‖_row) ⊙ (W + s·B A)

The row norm is detached (paper §4.3, as PEFT), so it is a per-step constant: we get it from
    ‖w_i + s·B_i A‖² = ‖w_i‖² + 2s·B_i·(A w_i) + s²·B_iᵀ (A Aᵀ) B_i
with ‖w_i‖² cached until the base weight changes: one (d_out, r) product W Aᵀ per step instead of
PEFT's eye(d_in) pass that builds the d_out×d_in matrix B A (and then W + s·B A) every step.

`with_lora`/`apply_lora` build these layers for `LoraConfig(use_dora=True)` through the layer registry
(`lorakit.variants.register` puts them there); files keep PEFT's `lora_magnitude_vector` key, so PEFT reads them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import bases, ops
from ..adapter_set import DEFAULT_ADAPTER
from ..cache import TensorCache
from ..config import LoraConfig
from ..layers import LoraLinear

if TYPE_CHECKING:
    from ..ops_linear import Decode


def row_sqnorm(weight: Tensor) -> Tensor:
    """‖w_i‖² per output row of a (d_out, d_in) weight, in fp32 (fp64 for fp64): the cacheable part of the norm."""
    return torch.linalg.vector_norm(weight, dim=1, dtype=_acc(weight)).square_()


def _acc(weight: Tensor) -> torch.dtype:
    """The dtype the norm accumulates in: fp32, or fp64 for an fp64 weight."""
    return torch.promote_types(weight.dtype, torch.float32)


def weight_norm(weight: Tensor, A: Tensor, B: Tensor, scaling: float, w_sqnorm: Tensor | None = None) -> Tensor:
    """‖W + s·B A‖ per output row (d_out,) in fp32, detached, without forming a d_out×d_in matrix."""
    with torch.no_grad():
        sq = row_sqnorm(weight) if w_sqnorm is None else w_sqnorm
        Af, Bf = A.detach().to(_acc(weight)), B.detach().to(_acc(weight))  # (r, d_in), (d_out, r): small
        WA = (weight @ A.detach().to(weight.dtype).t()).to(_acc(weight))  # (d_out, r): A w_i for every row
        cross = (Bf * WA).sum(1)  # (d_out,)  B_i·(A w_i)
        quad = ((Bf @ (Af @ Af.t())) * Bf).sum(1)  # (d_out,)  B_iᵀ (A Aᵀ) B_i
        return (sq + (2.0 * scaling) * cross + (scaling * scaling) * quad).clamp_min_(0.0).sqrt_()


def weight_norm_reference(weight: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """The norm as PEFT computes it, forming W + s·B A (for tests and the benchmark)."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight.float() + ops.delta_weight(A, B, scaling), dim=1)


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    magnitude: Tensor,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
    w_sqnorm: Tensor | None = None,
    fan_in_fan_out: bool = False,
    decode: Decode | None = None,
) -> Tensor:
    """The DoRA linear forward. `weight` is (d_out, d_in), or a quantised base's stored tensor with its `decode`;
    `w_sqnorm` its `row_sqnorm`, if known; `fan_in_fan_out` and `decode` as in `ops.lora_linear` (the base term is
    the base's own GEMM, bias included).

    Without dropout this is g ⊙ (u − b) + b with u = lora_linear(x) (bias included) and g = m/‖W + s·B A‖,
    so the LoRA fast path does the GEMMs and autograd adds only two output-sized passes; written
    g⊙u + (1−g)⊙b so that g = 1 (a fresh layer) gives u, which is then the base's output bit for bit.
    With dropout, PEFT's form: the dropped input feeds the direction term,
    base(x) + (g-1)⊙(drop(x) Wᵀ) + g⊙s·(drop(x) Aᵀ) Bᵀ (one more GEMM).
    """
    wd = ops.decode_weight(weight, x.dtype, decode)  # (d_out, d_in)
    norm = weight_norm(wd, A, B, scaling, w_sqnorm)  # (d_out,) fp32/fp64, constant for autograd
    g = (magnitude.to(norm.dtype) / norm).to(x.dtype)  # (d_out,) exactly 1 where m is this very norm (init)
    if dropout > 0.0 and training:
        xd = F.dropout(x, dropout, True)
        y = ops.base_linear(x, wd, bias, fan_in_fan_out)  # (..., d_out)
        direction = ops.lora_linear(xd, weight, None, A, B, scaling, fan_in_fan_out=fan_in_fan_out, decode=decode)
        return y + (g * direction - ops.base_linear(xd, wd, None, fan_in_fan_out))
    u = ops.lora_linear(
        x, weight, bias, A, B, scaling, fan_in_fan_out=fan_in_fan_out, decode=decode
    )  # (..., d_out): x Wᵀ + b + s·x Aᵀ Bᵀ
    return u * g if bias is None else torch.addcmul(bias * (1 - g), u, g)  # (1−g)⊙b is (d_out,): one output pass


def dora_linear_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, magnitude: Tensor, scaling: float
) -> Tensor:
    """The formula written naively (no dropout): the merged DoRA weight applied to x."""
    V = weight + scaling * (B @ A)  # (d_out, d_in)
    norm = torch.linalg.vector_norm(V, dim=1).detach()
    return F.linear(x, (magnitude / norm)[:, None] * V, bias)


def merged_delta(weight: Tensor, A: Tensor, B: Tensor, magnitude: Tensor, scaling: float) -> Tensor:
    """g ⊙ (W + s·B A) − W in fp32, (d_out, d_in): what `ops.merged_weight` adds to W to merge a DoRA adapter."""
    V = ops.delta_weight(A, B, scaling).add_(weight)  # (d_out, d_in) fp32: the direction, formed once for the merge
    g = magnitude.detach().float() / torch.linalg.vector_norm(V, dim=1)
    return V.mul_(g[:, None]).sub_(weight)


class DoraLinear(LoraLinear):
    """DoRA beside an nn.Linear: LoRA's A (r, d_in) and B (d_out, r), plus the magnitude `lora_magnitude` (d_out,).

    Examples:
        >>> import lorakit as lk
        >>> layer = lk.with_lora(nn.Linear(8, 6), lk.LoraConfig(rank=2, use_dora=True))
        >>> type(layer).__name__, tuple(layer.lora_magnitude.shape)
        ('DoraLinear', (6,))
    """

    tensor_names = (*LoraLinear.tensor_names, "lora_magnitude")
    variant = "dora"
    lora_magnitude: nn.Parameter | None  # (d_out,), bound with lora_A and lora_B (None while none is active)

    def __init__(self, base: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__(base, config, adapter_name)
        self._w_sqnorm: TensorCache[Tensor] = TensorCache()  # ‖w_i‖², keyed on the base weight: follows merge_, .to()
        if self.base_init is not None:  # PiSSA/OLoRA moved W: m is the norm of the weight as it now is (as PEFT)
            A, B, magnitude, config = self._active()
            with torch.no_grad():
                magnitude.copy_(self._initial_magnitude(A, B, config))

    def _active(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter, LoraConfig]:
        """(lora_A, lora_B, lora_magnitude, config) of the active adapter; LoraStateError where none is active."""
        A, B, config = self.active_factors()
        magnitude = self.lora_magnitude
        assert magnitude is not None, "adapter_set.py binds the magnitude with A and B"
        return A, B, magnitude, config

    def _initial_magnitude(self, A: Tensor, B: Tensor, config: LoraConfig) -> Tensor:
        """m = ‖W + s·B A‖ per row, so a fresh layer computes exactly what its base did."""
        w = bases.dense_weight(self.base, self.fan_in_fan_out)
        return weight_norm(w, A, B, config.scaling).to(w.dtype)

    def new_adapter(self, config: LoraConfig) -> dict[str, nn.Parameter]:
        tensors = super().new_adapter(config)
        tensors["lora_magnitude"] = nn.Parameter(self._initial_magnitude(tensors["lora_A"], tensors["lora_B"], config))
        return tensors

    @classmethod
    def adapter_shapes(cls, base: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
        shapes = super().adapter_shapes(base, config)
        return {**shapes, "lora_magnitude": shapes["lora_B"][:1]}  # (d_out,)

    def lora_forward(self, x: Tensor) -> Tensor:
        A, B, magnitude, config = self._active()
        w_sqnorm = self._w_sqnorm.get([bases.weight(self.base)], self._row_sqnorm)
        weight, decode = bases.linear_operand(self.base, self.fan_in_fan_out)
        return dora_linear(
            x,
            weight,
            bases.bias(self.base),
            A,
            B,
            magnitude,
            config.scaling,
            config.dropout,
            self.training,
            w_sqnorm,
            self._conv1d_gemm(),
            decode,
        )

    def _row_sqnorm(self) -> Tensor:
        """‖w_i‖² of the base weight as it is now (what `_w_sqnorm` caches)."""
        return row_sqnorm(bases.dense_weight(self.base, self.fan_in_fan_out))

    def weight_delta(self) -> Tensor:
        if self.adapter_name is None:
            return super().weight_delta()
        A, B, magnitude, config = self._active()  # merged W' = g ⊙ (W + s·B A), so the delta is W' − W
        delta = merged_delta(bases.dense_weight(self.base, self.fan_in_fan_out), A, B, magnitude, config.scaling)
        return delta.t() if self.fan_in_fan_out else delta

    def merged_weight(self, weight: Tensor) -> Tensor:
        return ops.merged_weight(weight, self.weight_delta())  # not low rank: no addmm shortcut

    def mixed_forward(self, x: Tensor, *state: Tensor) -> Tensor:
        # mixed_batch refuses a batch that names a DoRA adapter (the row norm is per adapter), and a layer holds one
        # variant, so no row of a mixed batch uses this layer's adapters: every row runs the bare base here
        return self.base(x)


class DoraConv1D(DoraLinear):
    """DoRA beside transformers' GPT-2 style Conv1D, whose weight is stored (d_in, d_out)."""

    fan_in_fan_out = True
