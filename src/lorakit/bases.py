"""What a LoRA layer asks of its frozen base: the weight as a plain tensor, its shape, a plain copy.

A base that keeps its weight in another form (a quantised one, `lorakit.variants.quant`) implements
`QuantizedBase`: its format writes the stored tensor and decodes it. Every LoRA layer goes through the
functions here, never through a storage format, so a new format is one class and no change to the core.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .ops_linear import Decode

# how a stored weight becomes a plain tensor: decode(stored, dtype) (dtype None: the format's own)


class QuantizedBase(nn.Module, ABC):
    """A frozen linear base whose weight is stored in another form, as (d_out, d_in) whatever the original layout.

    `weight` is the stored tensor and `decode` its format's way back to a plain tensor. The LoRA linear ops take
    both (`linear_operand`) and decode inside forward and backward, so autograd saves the stored form, not a
    dense copy.
    """

    in_features: int
    out_features: int
    weight: Tensor  # the stored form (packed int8, an NF4Tensor, ...)
    dtype: torch.dtype  # the dtype of the weight it was made from: what it dequantises to by default
    format: str  # the storage format's name, as fingerprints record it
    # the weight it was made from, as `files.provenance.weight_record` gives it, where known (`lorakit.fingerprint`)
    source_fingerprint: dict[str, Any] | None = None

    @staticmethod
    @abstractmethod
    def decode(stored: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A stored tensor of this format (the weight, or the very tensor autograd saved of it) as a plain
        (d_out, d_in) tensor in `dtype`."""

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight as a plain (d_out, d_in) tensor in `dtype` (default: the original dtype)."""
        return self.decode(self.weight, dtype or self.dtype)

    @abstractmethod
    def dequantized(self) -> nn.Module:
        """A plain module of the original type holding the dequantised weight (and a copy of the bias)."""


def dense_weight(base: nn.Module, fan_in_fan_out: bool = False) -> Tensor:
    """The base weight laid out (d_out, d_in, ...) as a plain tensor: a layer's dense weight, whatever its storage.

    A plain weight comes back as a view (writes reach the base; `fan_in_fan_out` transposes a (d_in, d_out)
    one such as GPT-2's Conv1D); a quantised one dequantised, in its original dtype.
    """
    if isinstance(base, QuantizedBase):
        return base.dequantize()
    w = weight(base)
    return w.t() if fan_in_fan_out else w


def linear_operand(base: nn.Module, fan_in_fan_out: bool = False) -> tuple[Tensor, Decode | None]:
    """The base weight as the LoRA linear ops take it: (weight (d_out, d_in), decode).

    A plain weight is the view `dense_weight` gives, with no decode; a quantised one is its stored tensor with
    its format's `decode`, which the ops call where they use W, so autograd saves the stored form.
    """
    if isinstance(base, QuantizedBase):
        return base.weight, base.decode
    return dense_weight(base, fan_in_fan_out), None


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
