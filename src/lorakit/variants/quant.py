"""QLoRA: store the frozen base weight of each wrapped linear layer quantised; dequantise it on the fly.

    quantize_base(model, "nf4")    # 4-bit NormalFloat (Dettmers et al. 2023) via torchao's NF4Tensor
    quantize_base(model, "int8")   # per-row absmax int8, written here (8 bits + one fp32 scale per row)

Only the frozen base weights change; lora_A/lora_B (and DoRA's magnitude) stay in full precision and
train as before. Each format is a `QuantLinear` class that writes its stored tensor (`quantize`) and decodes it
(`decode`, the `bases.QuantizedBase` interface the core calls). The stored weight is what autograd saves: the
LoRA linear Function decodes it in forward and again in backward (NF4 through `variants.nf4`, torchao's values
bit for bit at a tenth of its own path's time), so no dense copy of W stays alive between the two.
`lorakit.merge(model)` returns plain layers of the original type holding the dequantised merged weight.
NF4 needs torchao (`pip install lorakit[quant]`); int8 needs nothing extra.
"""

from __future__ import annotations

import copy
import math
from abc import abstractmethod

import torch
from torch import Tensor, nn

from .. import bases
from ..bases import QuantizedBase
from ..errors import LoraStateError
from ..files import provenance
from ..layers import LoraLayer, LoraLinear
from ..model import lora_layers
from ..param_layers import LoraParam
from . import nf4
from .quant_experts import expert_layers, quantize_experts_
from .stored import exact_clone, tensor_bytes

NF4_BLOCK = 64  # weights per absmax block (QLoRA's choice)
NF4_SCALER_BLOCK = 256  # blocks per block of double-quantised scales


def quantize_int8(weight: Tensor) -> Tensor:
    """Per-row absmax int8, packed as one int8 tensor (d_out, d_in + 4): each row's fp32 scale in its last 4 bytes.

    Packing keeps the quantised weight a single tensor, so autograd can save it and `Int8Linear.decode` can
    dequantise it without side tables.
    """
    w = weight.detach().float()  # (d_out, d_in)
    scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min_(torch.finfo(torch.float32).tiny)  # (d_out, 1)
    q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)  # (d_out, d_in)
    return torch.cat([q, scale.view(torch.int8)], dim=1)  # (d_out, d_in + 4)


def quantize_nf4(weight: Tensor) -> Tensor:
    """torchao's NF4Tensor of `weight` (d_out, d_in); block sizes shrink for small layers where needed."""
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError as e:
        raise ImportError("NF4 quantisation needs torchao: pip install 'lorakit[quant]' (or use 'int8')") from e
    n = weight.numel()
    if n % NF4_BLOCK:
        raise ValueError(f"NF4 needs a weight size divisible by {NF4_BLOCK}; this one has {n} elements (use 'int8')")
    blocks = n // NF4_BLOCK
    scaler_block = math.gcd(blocks, NF4_SCALER_BLOCK)  # 256 for real layers; smaller for toy ones
    return to_nf4(weight.detach().contiguous(), NF4_BLOCK, scaler_block)


class QuantLinear(QuantizedBase):
    """A frozen linear layer whose weight (d_out, d_in) is stored quantised; the base of a quantised LoraLinear.

    One subclass per storage format (`FORMATS`), each writing its stored tensor (`quantize`) and decoding it
    (`decode`). `weight` is the stored tensor, `dtype` the dtype it dequantises to. `dequantized()` rebuilds
    the original module type (nn.Linear or GPT-2's Conv1D). LoRA layers see it through `lorakit.bases`, never
    through its storage format.
    """

    bias: Tensor | None  # the original layer's own bias parameter, kept as is

    def __init__(self, base: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__()
        w = bases.weight(base).detach()
        self.source_fingerprint = provenance.weight_record(w)  # before quantising: what a QLoRA adapter's base is
        w = w.t() if fan_in_fan_out else w  # (d_out, d_in) whatever the original layout
        self.dtype, self.fan_in_fan_out, self.orig_type = w.dtype, fan_in_fan_out, type(base)
        self.out_features, self.in_features = w.shape
        self.weight = nn.Parameter(self.quantize(w), requires_grad=False)
        self.bias = bases.bias(base)  # kept as is: it may train under bias="all"

    @staticmethod
    @abstractmethod
    def quantize(weight: Tensor) -> Tensor:
        """The stored tensor of a plain (d_out, d_in) weight in this format."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.dequantize(x.dtype), self.bias)

    def __deepcopy__(self, memo: dict[int, object]) -> QuantLinear:
        # torchao's NF4Tensor copies by re-quantising with default block sizes, which fails for small layers
        # (and may not reproduce the stored values): copy the stored tensor exactly, the rest as usual (the copy
        # protocol's own steps: a new instance, then its state deep-copied through __setstate__)
        weight = self.weight
        memo[id(weight)] = nn.Parameter(exact_clone(weight.detach()), requires_grad=False)
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(vars(self), memo))
        return new

    def dequantized(self) -> nn.Module:
        """A plain module of the original type with the dequantised weight (and a copy of the bias)."""
        w = self.dequantize().detach()
        has_bias = self.bias is not None
        if self.fan_in_fan_out:  # transformers' Conv1D(nf=d_out, nx=d_in), weight (d_in, d_out)
            plain = self.orig_type(self.out_features, self.in_features)
            w = w.t()
        else:
            plain = nn.Linear(self.in_features, self.out_features, bias=has_bias)
        plain = plain.to(device=w.device, dtype=self.dtype)
        with torch.no_grad():
            bases.weight(plain).copy_(w)
            plain_bias = bases.bias(plain)
            if self.bias is not None:
                assert plain_bias is not None, "nn.Linear(bias=True) and Conv1D have a bias"
                plain_bias.copy_(self.bias)
            elif plain_bias is not None:
                plain.register_parameter("bias", None)  # Conv1D always makes one
        return plain.requires_grad_(False)

    def weight_bytes(self) -> int:
        """Bytes the quantised weight occupies (every inner tensor of an NF4Tensor counted)."""
        return tensor_bytes(self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


class Int8Linear(QuantLinear):
    """Per-row absmax int8 (`quantize_int8`): (d_out, d_in + 4) int8, each row's fp32 scale in its last 4 bytes."""

    format = "int8"
    quantize = staticmethod(quantize_int8)

    @staticmethod
    def decode(stored: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The packed rows times their scales, in `dtype` (default fp32, the scales' dtype)."""
        scale = stored[:, -4:].contiguous().view(torch.float32)  # (d_out, 1)
        return stored[:, :-4] * scale.to(dtype or torch.float32)  # int8 · scale promotes to the scale's dtype


class NF4Linear(QuantLinear):
    """4-bit NormalFloat as torchao's NF4Tensor (`quantize_nf4`), decoded by `variants.nf4` in one table gather."""

    format = "nf4"
    quantize = staticmethod(quantize_nf4)

    @staticmethod
    def decode(stored: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """torchao's `get_original_weight().to(dtype)` bit for bit, about ten times faster on CPU."""
        return nf4.dequantize(stored, dtype)


FORMATS: dict[str, type[QuantLinear]] = {"nf4": NF4Linear, "int8": Int8Linear}


def format_class(fmt: str) -> type[QuantLinear]:
    """The QuantLinear class that stores weights in format `fmt`; ValueError listing the formats."""
    if fmt not in FORMATS:
        raise ValueError(f"quantisation format {fmt!r} is invalid: expected one of {', '.join(map(repr, FORMATS))}")
    return FORMATS[fmt]


def quantize_base(model: nn.Module, fmt: str = "nf4") -> nn.Module:
    """Quantise the frozen base weight of every LoRA linear layer in `model` (in place); returns the model.

    The 3-D expert weights LoRA adapts (`target_parameters` on transformers experts modules) are quantised too,
    each expert apart (`lorakit.variants.quant_experts`): the routed forward decodes only the experts it uses.

    Examples:
        >>> import lorakit as lk
        >>> m = lk.apply_lora(nn.Sequential(nn.Linear(64, 64)), lk.LoraConfig(rank=2), ["0"])
        >>> type(quantize_base(m, "int8")[0].base).__name__
        'Int8Linear'
    """
    quantized = format_class(fmt)
    layers = {n: layer for n, layer in lora_layers(model).items() if isinstance(layer, LoraLinear)}
    experts = expert_layers(model)
    if not layers and not experts:
        raise ValueError("the model has no LoRA linear layers or expert weights to quantise; apply_lora first")
    for name, layer in layers.items():
        _check_linear(name, layer, fmt)
    for name, expert in experts.items():
        _check_experts(name, expert, fmt)
    for layer in layers.values():
        layer.base = quantized(layer.base, type(layer).fan_in_fan_out)  # stored (d_out, d_in) either way
    for expert in experts.values():
        quantize_experts_(expert, quantized)
    return model


def _check_linear(name: str, layer: LoraLinear, fmt: str) -> None:
    if layer.merged:
        raise LoraStateError(f"{name!r} is merged in place; call unmerge_(model) before quantising")
    if isinstance(layer.base, QuantizedBase):
        raise LoraStateError(f"{name!r} is already quantised ({layer.base.format})")
    if fmt == "nf4" and (n := bases.weight(layer.base).numel()) % NF4_BLOCK:
        raise ValueError(
            f"{name!r}: NF4 needs a weight size divisible by {NF4_BLOCK}, it has {n} elements "
            "(use 'int8' or exclude it)"
        )


def _check_experts(name: str, layer: LoraParam, fmt: str) -> None:
    where = f"{name!r} ({layer.param_name})"
    if layer.merged:
        raise LoraStateError(f"{where} is merged in place; call unmerge_(model) before quantising")
    if layer.quantized is not None:
        raise LoraStateError(f"{where} is already quantised ({layer.quantized.format})")
    per_expert = layer.param[0].numel()
    if fmt == "nf4" and per_expert % NF4_BLOCK:
        raise ValueError(
            f"{where}: NF4 stores each expert in blocks of {NF4_BLOCK} weights; one expert of shape "
            f"{tuple(layer.param.shape[1:])} has {per_expert} (use 'int8' or leave it unquantised)"
        )


def quantized_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The LoRA layers whose base is quantised, by module name."""
    return {n: layer for n, layer in lora_layers(model).items() if bases.is_quantized(layer.base)}
