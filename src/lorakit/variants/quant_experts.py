"""QLoRA on mixture-of-experts weights: a fused 3-D expert parameter stored quantised, one tensor per expert.

    quantize_base(model, "nf4")   # (lorakit.variants.quant) also quantises every adapted 3-D expert parameter

A transformers experts module holds each projection of all its experts as one 3-D parameter, (E, d_out, d_in)
(Qwen3-MoE, Mixtral: `F.linear(x, W[e])`) or (E, d_in, d_out) when it `is_transposed` (gpt-oss: `x @ W[e]`).
`QuantExperts` stores expert e's slice as its format's (d_out, d_in) tensor (`QuantLinear.quantize`: NF4 through
torchao, or int8), so the routed forward decodes one expert at a time, only the experts that received tokens, with
the same decode the quantised linear layers use, in a Function that keeps the stored tensor, not a dense copy,
for backward. The `LoraParam` that adapts the parameter keeps the store (`layer.quantized`) and passes it to the
routed forward (`ops_experts.experts_forward`) in place of the parameter; the owner's own parameter becomes a
meta tensor of the same shape and dtype (no storage; any computation that would still read it fails loudly).
Quantise after adding the adapters: factors made later would follow the owner's (meta) parameter.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

from ..files import provenance
from ..model import lora_layers
from ..param_layers import LoraParam
from .stored import exact_clone, tensor_bytes


class StorageFormat(Protocol):
    """A quantised storage format (`lorakit.variants.quant.QuantLinear`'s subclasses): its name, how it stores a
    plain (d_out, d_in) weight and how it decodes the stored tensor."""

    format: str

    @staticmethod
    def quantize(weight: Tensor) -> Tensor:
        """The stored tensor of a plain (d_out, d_in) weight."""
        ...

    @staticmethod
    def decode(stored: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A stored tensor back as a plain (d_out, d_in) tensor in `dtype`."""
        ...


class _DecodedLinear(torch.autograd.Function):
    """F.linear(x, decode(stored)) for a frozen stored weight: the stored tensor is what backward keeps."""

    @staticmethod
    def forward(ctx, x: Tensor, stored: Tensor, decode: Callable[..., Tensor]) -> Tensor:
        ctx.save_for_backward(stored)
        ctx.decode = decode
        return torch.nn.functional.linear(x, decode(stored, x.dtype))

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, None, None]:
        (stored,) = ctx.saved_tensors
        gx = gy @ ctx.decode(stored, gy.dtype) if ctx.needs_input_grad[0] else None
        return gx, None, None


class QuantExperts(nn.Module):
    """A frozen 3-D expert weight (E, d1, d2) stored quantised, expert by expert, each as (d_out, d_in).

    `transposed`: the owner computes `x @ W[e]` (W[e] is (d_in, d_out)), else `F.linear(x, W[e])`.
    `dtype` is the dtype of the weight it was made from, what `expert` and `dequantize` return by default.
    """

    def __init__(self, weight: Tensor, quant_class: type[StorageFormat], transposed: bool) -> None:
        super().__init__()
        if weight.dim() != 3:
            raise ValueError(f"expert weights are 3-D (experts, d1, d2); got shape {tuple(weight.shape)}")
        self.quant_class = quant_class
        self.format, self.transposed, self.dtype = quant_class.format, transposed, weight.dtype
        self.shape = tuple(weight.shape)
        w = weight.detach()
        self.source_fingerprint = provenance.weight_record(w)  # before quantising: what a QLoRA adapter's base is
        slices = [w[e].t() if transposed else w[e] for e in range(w.shape[0])]  # each (d_out, d_in)
        self.weights = nn.ParameterList(
            [nn.Parameter(self.quant_class.quantize(s.contiguous()), requires_grad=False) for s in slices]
        )

    @property
    def num_experts(self) -> int:
        """How many experts the parameter holds."""
        return self.shape[0]

    def decode(self, stored: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """One stored expert tensor (or the very tensor autograd saved of it) as a plain (d_out, d_in) tensor."""
        return self.quant_class.decode(stored, dtype)

    def expert(self, e: int, dtype: torch.dtype | None = None) -> Tensor:
        """Expert e's weight as a plain (d_out, d_in) tensor in `dtype` (default: the original dtype)."""
        return self.decode(self.weights[e], dtype or self.dtype)

    def expert_linear(self, e: int, x: Tensor) -> Tensor:
        """x (n, d_in) through expert e's frozen weight, (n, d_out): decoded in forward and again in backward for
        the input gradient, so autograd keeps the quantised tensor, not a dense copy."""
        return _DecodedLinear.apply(x, self.weights[e], self.decode)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The whole parameter in its owner's layout (E, d1, d2), in `dtype` (default: the original dtype)."""
        experts = [self.expert(e, dtype) for e in range(self.num_experts)]
        return torch.stack([w.t() if self.transposed else w for w in experts])

    def weight_bytes(self) -> int:
        """Bytes the quantised experts occupy (every inner tensor of an NF4Tensor counted)."""
        return sum(tensor_bytes(w) for w in self.weights)

    def __deepcopy__(self, memo: dict[int, object]) -> QuantExperts:
        # torchao's NF4Tensor copies by re-quantising with default block sizes (QuantLinear.__deepcopy__):
        # copy each stored tensor exactly, the rest as usual
        for w in self.weights:
            memo[id(w)] = nn.Parameter(exact_clone(w.detach()), requires_grad=False)
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(vars(self), memo))
        return new

    def extra_repr(self) -> str:
        return f"shape={self.shape}, format={self.format}, transposed={self.transposed}"


EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


def expert_layers(model: nn.Module) -> dict[str, LoraParam]:
    """The LoRA layers on a transformers experts module's 3-D weights (gate_up_proj / up_proj / down_proj)."""
    return {
        n: layer
        for n, layer in lora_layers(model).items()
        if isinstance(layer, LoraParam) and layer.param_name in EXPERT_WEIGHTS and layer.num_experts is not None
    }


def quantize_experts_(layer: LoraParam, quant_class: type[StorageFormat]) -> None:
    """Store `layer`'s 3-D parameter quantised (`layer.quantized`); the owner's parameter becomes a meta tensor."""
    owner, name = layer.owner, layer.param_name
    p = owner._parameters[name]
    assert p is not None, "a LoraParam's parameter exists"
    layer.quantized = QuantExperts(p, quant_class, layer.is_transposed)
    owner._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
