"""What a LoRA layer asks of its frozen base: the weight as a plain tensor, its shape, a plain copy.

A base that keeps its weight in another form (a quantised one, `lorakit.variants.quant.QuantLinear`)
implements `QuantizedBase`; every LoRA layer goes through the functions here, never through the
weight's storage format, so a new storage format is one class and no change to the layers.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn


class QuantizedBase(nn.Module, ABC):
    """A frozen linear base whose weight is stored in another form, as (d_out, d_in) whatever the original layout.

    `weight` is the stored tensor, which `ops.dense` dequantises: the LoRA linear passes it to the ops
    so that autograd saves the stored form, not a dense copy.
    """

    in_features: int
    out_features: int
    weight: Tensor  # the stored form (packed int8, an NF4Tensor, ...)
    # the weight it was made from, as `files.provenance.weight_record` gives it, where known (`lorakit.fingerprint`)
    source_fingerprint: dict[str, Any] | None = None

    @abstractmethod
    def dense_weight(self) -> Tensor:
        """The weight dequantised: a plain (d_out, d_in) tensor in the original dtype."""

    @abstractmethod
    def dequantized(self) -> nn.Module:
        """A plain module of the original type holding the dequantised weight (and a copy of the bias)."""


def dense_weight(base: nn.Module, fan_in_fan_out: bool = False, *, stored: bool = False) -> Tensor:
    """The base weight laid out (d_out, d_in, ...) as a plain tensor.

    A plain weight comes back as a view (writes reach the base; `fan_in_fan_out` transposes a (d_in, d_out)
    one such as GPT-2's Conv1D); a quantised one dequantised, or with `stored=True` as its stored tensor.
    """
    if isinstance(base, QuantizedBase):
        return base.weight if stored else base.dense_weight()
    w = weight(base)
    return w.t() if fan_in_fan_out else w


def weight_shape(base: nn.Module, fan_in_fan_out: bool = False) -> tuple[int, ...]:
    """The shape `dense_weight` has, without dequantising anything."""
    if isinstance(base, QuantizedBase):
        return base.out_features, base.in_features
    shape = tuple(weight(base).shape)
    return shape[::-1] if fan_in_fan_out else shape


def weight(module: nn.Module) -> Tensor:
    """The module's `weight` tensor as stored; TypeError naming the module where it has none."""
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor (its weight is {type(w).__name__})")
    return w


def bias(module: nn.Module) -> Tensor | None:
    """The module's `bias` tensor, as its forward adds it; None where it has none."""
    b = getattr(module, "bias", None)
    return b if isinstance(b, Tensor) else None


def plain_copy(base: nn.Module) -> nn.Module:
    """A copy of the base as a plain module of its original type (a quantised base dequantised)."""
    return base.dequantized() if isinstance(base, QuantizedBase) else copy.deepcopy(base)


def own_bias(module: nn.Module) -> nn.Parameter | None:
    """The module's own `bias` parameter (not a child's), None where it has none."""
    return dict(module.named_parameters(recurse=False)).get("bias")


def is_quantized(base: nn.Module) -> bool:
    """Whether the base stores its weight quantised (then it cannot be merged in place)."""
    return isinstance(base, QuantizedBase)
