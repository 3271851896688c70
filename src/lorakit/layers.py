"""LoRA layers: each holds its frozen base plus the trainable factors `lora_A` and `lora_B`.

Dispatch is a registry {module type: wrapper}; adding a layer type is one class and one line.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from . import ops
from .config import BASE_CHANGING_INITS, LoraBias, LoraConfig
from .errors import LoraStateError


DEFAULT_ADAPTER = "default"
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def check_adapter_name(name: object) -> str:
    """Adapter names are short identifiers (letters, digits, '_' and '-'), usable as module keys."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise ValueError(f"adapter name {name!r} is invalid: expected letters, digits, '_' or '-'")
    if hasattr(nn.ModuleDict, name):
        raise ValueError(f"adapter name {name!r} is reserved (a torch.nn.Module attribute); choose another")
    return name


class StashedAdapter(nn.Module):
    """A named adapter that is not the active one on its layer: frozen factors plus their config."""

    def __init__(self, lora_A: nn.Parameter, lora_B: nn.Parameter, config: LoraConfig,
                 lora_magnitude: nn.Parameter | None = None) -> None:
        super().__init__()
        self.lora_A, self.lora_B, self.config, self.lora_magnitude = lora_A, lora_B, config, lora_magnitude
        for p in (lora_A, lora_B, lora_magnitude):
            if p is not None:
                p.requires_grad_(False)


class LoraLayer(nn.Module):
    """Common shell of every LoRA layer: frozen `base`, factors `lora_A` (r, d_in, ...) and `lora_B` (d_out, r, ...).

    `lora_A`/`lora_B`/`config` are the active adapter (named `adapter_name`); other named adapters wait,
    frozen, in `stash`. With no active adapter (`adapter_name is None`) the factors are None and the
    layer computes its base. Subclasses say how to build the factors' shapes, how to run forward,
    and how the weight delta is laid out.
    """

    def __init__(self, base: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        if config.rank_pattern or config.alpha_pattern:
            config = config.for_module("")
        self.base = base
        self.config: LoraConfig | None = config
        self.adapter_name: str | None = check_adapter_name(adapter_name)
        self.stash = nn.ModuleDict()
        self.merged = False
        self.disabled = False  # set by lorakit.adapters.disable_adapters: run the bare base
        self.mixed = None  # set by lorakit.adapters.mixed_batch: what mixed_forward needs, from mixed_state
        self._unmerged_weight: Tensor | None = None  # the exact base weight while merged in place
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_A, self.lora_B = self._new_factors(config)
        self.register_buffer("initial_A", None)  # PiSSA/OLoRA: the factors at init, whose product left the base
        self.register_buffer("initial_B", None)
        self.init_adapter: str | None = None  # the adapter they belong to
        if config.init in BASE_CHANGING_INITS:
            self._init_from_base(config)
        self.lora_magnitude: nn.Parameter | None = self._new_magnitude(config, self.lora_A, self.lora_B)
        if config.bias is LoraBias.ALL and getattr(base, "bias", None) is not None:
            base.bias.requires_grad_(True)

    def _new_factors(self, config: LoraConfig) -> tuple[nn.Parameter, nn.Parameter]:
        a_shape, b_shape = self.factor_shapes(self.base, config.rank)
        w = self.dense_weight()  # dtype/device of the factors (a quantised base gives its compute dtype)
        A = nn.Parameter(torch.empty(a_shape, dtype=w.dtype, device=w.device))
        B = nn.Parameter(torch.empty(b_shape, dtype=w.dtype, device=w.device))
        ops.init_factors_(A, B, config.init)
        return A, B

    peft_layout = "linear"  # which PEFT key names its tensors take (files.peft_format.SUFFIXES)
    supports_dora = False  # layer types with a DoRA forward and merge set this
    supports_base_init = False  # layer types that implement init="pissa"/"olora" set this

    def _init_from_base(self, config: LoraConfig) -> None:
        """PiSSA/OLoRA: A, B from the base weight, the base set to the residual (see ops.base_init)."""
        raise TypeError(f"init={config.init!r} is supported on linear layers only, not {type(self.base).__name__}")

    def exported_factors(self, name: str) -> tuple[Tensor, Tensor, LoraConfig]:
        """(A, B, config) of adapter `name` as a plain LoRA for the ORIGINAL base weight.

        For PiSSA/OLoRA the base holds W − s·B₀A₀, so the update to W is s·(B A − B₀A₀) = s·[B, −B₀][A; A₀]:
        a rank-2r LoRA with the same scaling (PEFT's path_initial_model_for_weight_conversion).
        """
        A, B, config = self.factors(name)
        if config.init not in BASE_CHANGING_INITS or name != self.init_adapter:
            return A, B, config
        r2 = 2 * config.rank
        alpha = config.alpha * (2 ** 0.5 if config.use_rslora else 2.0)  # same scaling at rank 2r
        exported = LoraConfig(**{**config.to_dict(), "rank": r2, "alpha": alpha, "init": "kaiming"})
        assert abs(exported.scaling - config.scaling) <= 1e-12 * config.scaling
        A2 = torch.cat([A.detach(), self.initial_A.to(A.dtype)])  # (2r, d_in)
        B2 = torch.cat([B.detach(), -self.initial_B.to(B.dtype)], dim=1)  # (d_out, 2r)
        return A2, B2, exported

    def _new_magnitude(self, config: LoraConfig, A: Tensor, B: Tensor) -> nn.Parameter | None:
        """DoRA's magnitude m (d_out,), initialised to ‖W + s·B A‖ per row so the layer starts unchanged."""
        if not config.use_dora:
            return None
        if not self.supports_dora:
            raise TypeError(f"DoRA (use_dora=True) is not supported on {type(self.base).__name__}; "
                            f"supported: {', '.join(sorted(dora_types()))}")
        w = self.dense_weight()
        return nn.Parameter(ops.dora_weight_norm(w, A, B, config.scaling).to(w.dtype))

    def dense_weight(self) -> Tensor:
        """The base weight as a plain (d_out, d_in, ...) tensor (dequantised where the base is quantised)."""
        return self.base_weight

    def magnitude(self, name: str) -> nn.Parameter | None:
        """DoRA magnitude of the named adapter (None for plain LoRA)."""
        self.factors(name)  # raises for an unknown name
        return self.lora_magnitude if name == self.adapter_name else self.stash[name].lora_magnitude

    # -- what subclasses define -------------------------------------------------------------------
    @classmethod
    def factor_shapes(cls, base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (lora_A, lora_B) for LoRA of `rank` beside `base`."""
        raise NotImplementedError

    def lora_forward(self, x: Tensor) -> Tensor:
        """base(x) + scaling · B(A(dropout(x)))."""
        raise NotImplementedError

    def weight_delta(self) -> Tensor:
        """scaling · B @ A in fp32, laid out like the base's weight (zero with no active adapter)."""
        if self.lora_A is None:
            a_shape, b_shape = self.factor_shapes(self.base, 1)
            return torch.zeros(b_shape[0], *a_shape[1:], device=self.base_weight.device)
        return ops.delta_weight(self.lora_A, self.lora_B, self.scaling)

    # -- shared behaviour -------------------------------------------------------------------------
    @property
    def base_weight(self) -> Tensor:
        return self.base.weight

    @property
    def scaling(self) -> float:
        return self.config.scaling

    @property
    def rank(self) -> int:
        return self.config.rank

    def forward(self, x: Tensor) -> Tensor:
        if self.mixed is not None:
            return self.mixed_forward(x, *self.mixed)
        if self.merged or self.disabled or self.lora_A is None:
            return self.base(x)
        return self.lora_forward(x)

    def mixed_state(self, A: Tensor, B: Tensor, slots: Tensor) -> tuple[Tensor, ...]:
        """What `mixed_forward` takes after x, prepared once per mixed batch from the stacks and row -> slot."""
        return A, B, slots

    def mixed_forward(self, x: Tensor, A: Tensor, B: Tensor, slots: Tensor) -> Tensor:
        """base(x) + each batch row's own adapter: A (n, r, ...), B (n, d_out, r, ...) pre-scaled, slots (batch,)."""
        raise NotImplementedError(f"{type(self).__name__} does not run mixed-adapter batches")

    # -- named adapters -----------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        """Every adapter this layer holds, active first."""
        return ([self.adapter_name] if self.adapter_name else []) + list(self.stash)

    def factors(self, name: str) -> tuple[nn.Parameter, nn.Parameter, LoraConfig]:
        """(lora_A, lora_B, config) of the named adapter, active or stashed."""
        if name == self.adapter_name:
            return self.lora_A, self.lora_B, self.config
        if name in self.stash:
            s = self.stash[name]
            return s.lora_A, s.lora_B, s.config
        raise KeyError(f"adapter {name!r} is not on this layer; it has {self.adapter_names()}")

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        """Add a named adapter, freshly initialised and stashed (inactive)."""
        check_adapter_name(name)
        if config.init in BASE_CHANGING_INITS or self.initial_A is not None:
            raise ValueError(f"PiSSA/OLoRA change the base weight at init, so such an adapter cannot sit beside "
                             f"others on one base; save it (it is converted for the original base) and load that")
        if name in self.adapter_names():
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if LoraBias.ALL in [config.bias] + [self.factors(n)[2].bias for n in self.adapter_names()]:
            raise ValueError("adapters with bias='all' train the shared base bias, so they cannot sit beside "
                             "other named adapters; use bias='none'")
        A, B = self._new_factors(config)
        self.stash[name] = StashedAdapter(A, B, config, self._new_magnitude(config, A, B))

    def activate(self, name: str | None) -> None:
        """Make `name` the active adapter (trainable), stashing the current one; None leaves only the base."""
        if name == self.adapter_name:
            return
        if self.merged:
            raise LoraStateError("cannot switch adapters while merged in place; call unmerge_() first")
        if name is not None and name not in self.stash:
            raise KeyError(f"adapter {name!r} is not on this layer; it has {self.adapter_names()}")
        if self.adapter_name is not None:
            self.stash[self.adapter_name] = StashedAdapter(self.lora_A, self.lora_B, self.config, self.lora_magnitude)
        if name is None:
            self.lora_A = self.lora_B = self.config = self.lora_magnitude = None
        else:
            s = self.stash.pop(name)
            self.lora_A, self.lora_B, self.config, self.lora_magnitude = s.lora_A, s.lora_B, s.config, s.lora_magnitude
            for p in (self.lora_A, self.lora_B, self.lora_magnitude):
                if p is not None:
                    p.requires_grad_(True)
        self.adapter_name = name

    def set_adapter_config(self, name: str, config: LoraConfig) -> None:
        """Replace a named adapter's config (alpha, dropout, ...) by a loaded one of the same rank."""
        if config.rank != self.factors(name)[2].rank:
            raise ValueError(f"rank {config.rank} does not match adapter {name!r}'s rank {self.factors(name)[2].rank}")
        if config.use_dora != self.factors(name)[2].use_dora:
            raise ValueError(f"use_dora={config.use_dora} does not match adapter {name!r}'s "
                             f"use_dora={self.factors(name)[2].use_dora}")
        if name == self.adapter_name:
            self.config = config
        else:
            self.stash[name].config = config

    def delete_adapter(self, name: str) -> None:
        """Drop a named adapter; deleting the active one leaves the layer with none active."""
        if name == self.adapter_name:
            if self.merged:
                raise LoraStateError("cannot delete the merged adapter; call unmerge_() first")
            self.lora_A = self.lora_B = self.config = self.lora_magnitude = None
            self.adapter_name = None
        elif name in self.stash:
            del self.stash[name]
        else:
            raise KeyError(f"adapter {name!r} is not on this layer; it has {self.adapter_names()}")

    def merged_weight(self, weight: Tensor) -> Tensor:
        """`weight` + this adapter's delta, in fp32, checked finite, in `weight`'s dtype and layout."""
        return ops.merged_weight(weight, self.weight_delta())

    def merge(self) -> nn.Module:
        """A plain copy of the base with W + scaling·B@A (and the bias as trained); this layer is unchanged."""
        quantized = getattr(self.base, "quantized", False)
        plain = self.base.dequantized() if quantized else copy.deepcopy(self.base)  # lorakit.quant: dense export
        if not self.merged:
            with torch.no_grad():
                plain.weight.copy_(self.merged_weight(plain.weight))
        for p in plain.parameters():
            p.requires_grad_(False)
        return plain

    def merge_(self) -> LoraLayer:
        """Merge in place for serving; `unmerge_()` restores the base weight bit for bit."""
        if self.merged:
            raise LoraStateError(f"{type(self).__name__} is already merged; call unmerge_() first")
        if getattr(self.base, "quantized", False):
            raise LoraStateError("a quantised base cannot be merged in place; merge() exports a dequantised layer")
        w = self.base_weight
        merged = self.merged_weight(w).contiguous()  # a new tensor
        # swap storages rather than clone + copy: the original tensor is kept as is, for an exact unmerge_
        self._unmerged_weight, w.data = w.data, merged
        self.merged = True
        return self

    def unmerge_(self) -> LoraLayer:
        """Undo `merge_()`: the base weight becomes exactly what it was."""
        if not self.merged:
            raise LoraStateError(f"{type(self).__name__} is not merged; nothing to unmerge")
        self.base_weight.data = self._unmerged_weight  # the very tensor merge_ set aside: bit for bit
        self._unmerged_weight = None
        self.merged = False
        return self

    def adapter_tensors(self) -> dict[str, Tensor]:
        """What an adapter file holds for this layer: lora_A, lora_B, and the bias under bias="all"."""
        if self.lora_A is None:
            return {}
        out = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        if self.lora_magnitude is not None:
            out["lora_magnitude"] = self.lora_magnitude
        if self.config.bias is LoraBias.ALL and getattr(self.base, "bias", None) is not None:
            out["bias"] = self.base.bias
        return out

    def save_adapter(self, path: str | Path) -> Path:
        """Write lora_A, lora_B (+ bias) to `<path>.safetensors`, config in the metadata."""
        from .saving import save_layer_adapter  # layers know nothing of files; saving does the work

        return save_layer_adapter(self, path)

    def load_adapter(self, path: str | Path) -> LoraLayer:
        """Load a file written by `save_adapter`; validated fully before anything is copied."""
        from .loading import load_layer_adapter

        load_layer_adapter(self, path)
        return self

    def extra_repr(self) -> str:
        c = self.config
        if c is None:
            return f"no active adapter, stashed={list(self.stash)}"
        return f"adapter={self.adapter_name!r}, rank={c.rank}, alpha={c.alpha:g}, scaling={self.scaling:g}, dropout={c.dropout:g}, merged={self.merged}"


class LoraLinear(LoraLayer):
    """LoRA beside an nn.Linear: A (r, d_in), B (d_out, r)."""

    fan_in_fan_out = False  # True where the base stores its weight as (d_in, d_out)

    @classmethod
    def factor_shapes(cls, base, rank):
        if getattr(base, "quantized", False):  # lorakit.quant.QuantLinear: the stored weight may be packed
            return (rank, base.in_features), (base.out_features, rank)
        d_out, d_in = base.weight.shape[::-1] if cls.fan_in_fan_out else base.weight.shape
        return (rank, d_in), (d_out, rank)

    supports_dora = True
    supports_base_init = True

    def _init_from_base(self, config):
        A, B, residual = ops.base_init(self.dense_weight(), config.rank, config.scaling, config.init,
                                       self.lora_A.dtype)
        with torch.no_grad():
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
            self.dense_weight().copy_(residual)  # a view of base.weight ((d_in, d_out) Conv1D included)
        self.initial_A, self.initial_B = A.clone(), B.clone()
        self.init_adapter = self.adapter_name

    def _linear_weight(self) -> Tensor:
        """The base weight as (d_out, d_in) for the ops: a view, or the quantised tensor (ops.dense reads it)."""
        if getattr(self.base, "quantized", False):  # lorakit.quant.QuantLinear stores (d_out, d_in) for either type
            return self.base.weight
        w = self.base_weight
        return w.t() if self.fan_in_fan_out else w  # a view, no copy

    def dense_weight(self):
        if getattr(self.base, "quantized", False):
            return self.base.dequantize()
        return self._linear_weight()  # (d_out, d_in)

    def _w_sqnorm(self) -> Tensor:
        """‖w_i‖² of the base weight for DoRA, cached until the weight changes (merge_, load, requantise)."""
        w = self.base_weight
        key = (id(w), w._version, w.device, w.dtype)
        cache = self.__dict__.get("_dora_sqnorm")
        if cache is None or cache[0] != key:
            cache = (key, ops.dora_row_sqnorm(self.dense_weight()))
            self.__dict__["_dora_sqnorm"] = cache
        return cache[1]

    def lora_forward(self, x):
        if self.lora_magnitude is not None:
            return ops.dora_linear(x, self._linear_weight(), self.base.bias, self.lora_A, self.lora_B,
                                   self.lora_magnitude, self.scaling, self.config.dropout, self.training,
                                   self._w_sqnorm())
        # a Conv1D base gets its own addmm (fan_in_fan_out), so a fresh layer is exactly its base on any CPU;
        # a quantised base (lorakit.quant) computes F.linear on (d_out, d_in) whatever the original type
        conv1d = self.fan_in_fan_out and not getattr(self.base, "quantized", False)
        return ops.lora_linear(x, self._linear_weight(), self.base.bias, self.lora_A, self.lora_B, self.scaling,
                               self.config.dropout, self.training, fan_in_fan_out=conv1d)

    def weight_delta(self):
        if self.lora_magnitude is not None:  # DoRA: merged W' = g ⊙ (W + s·B A), so the delta is W' - W
            delta = ops.dora_merged_delta(self.dense_weight(), self.lora_A, self.lora_B, self.lora_magnitude,
                                          self.scaling)
        else:
            delta = super().weight_delta()  # (d_out, d_in)
        return delta.t() if self.fan_in_fan_out else delta

    def mixed_state(self, A, B, slots):
        return ops.mixed_rows(A, B, slots)  # gathered once, not at every forward (a decode step is one token)

    def mixed_forward(self, x, At, Bt):
        return ops.lora_linear_mixed(x, self.dense_weight(), self.base.bias, At, Bt)

    def merged_weight(self, weight):
        if self.lora_magnitude is not None or self.lora_A is None:
            return super().merged_weight(weight)
        if self.fan_in_fan_out:  # W (d_in, d_out) + s·(B A)ᵀ = W + s·Aᵀ Bᵀ
            return ops.merged_low_rank(weight, self.lora_A.t(), self.lora_B.t(), self.scaling)
        return ops.merged_low_rank(weight, self.lora_B, self.lora_A, self.scaling)


class LoraConv1D(LoraLinear):
    """LoRA beside transformers' GPT-2 style Conv1D, whose weight is stored (d_in, d_out)."""

    fan_in_fan_out = True


class LoraEmbedding(LoraLayer):
    """LoRA beside an nn.Embedding: A (r, num_embeddings), B (embedding_dim, r), as PEFT lays them out."""

    peft_layout = "embedding"

    @classmethod
    def factor_shapes(cls, base, rank):
        num, dim = base.weight.shape
        return (rank, num), (dim, rank)

    def lora_forward(self, ids):
        # dropout has no meaning on token ids (PEFT skips it too)
        return ops.lora_embedding(ids, self.base, self.lora_A, self.lora_B, self.scaling)

    def weight_delta(self):
        return super().weight_delta().t()  # (num_embeddings, dim)

    def mixed_forward(self, ids, A, B, slots):
        return ops.lora_embedding_mixed(ids, self.base, A, B, slots)


class LoraConv(LoraLayer):
    """LoRA beside nn.Conv1d/2d/3d: A is a conv with the base's kernel (r, d_in, *k), B a 1×1 conv (d_out, r, 1...)."""

    @classmethod
    def factor_shapes(cls, base, rank):
        if base.groups != 1:
            raise TypeError(f"LoRA on a grouped convolution (groups={base.groups}) is not supported; expected groups=1")
        d_out, d_in, *kernel = base.weight.shape
        return (rank, d_in, *kernel), (d_out, rank, *([1] * len(kernel)))

    def lora_forward(self, x):
        return ops.lora_conv(x, self.base, self.lora_A, self.lora_B, self.scaling, self.config.dropout, self.training)

    def mixed_forward(self, x, A, B, slots):
        return ops.lora_conv_mixed(x, self.base, A, B, slots)


LORA_LAYERS: dict[type[nn.Module], type[LoraLayer]] = {
    nn.Linear: LoraLinear,
    nn.Embedding: LoraEmbedding,
    nn.Conv1d: LoraConv,
    nn.Conv2d: LoraConv,
    nn.Conv3d: LoraConv,
}


def dora_types() -> list[str]:
    """Module type names whose LoRA layer supports DoRA."""
    return sorted({t.__name__ for t, w in _registry().items() if w.supports_dora})


def _registry() -> dict[type[nn.Module], type[LoraLayer]]:
    """The registry, plus transformers' Conv1D once transformers is loaded (never imported just for this)."""
    hf = sys.modules.get("transformers.pytorch_utils")
    if hf is not None and getattr(hf, "Conv1D", None) not in (None, *LORA_LAYERS):
        LORA_LAYERS[hf.Conv1D] = LoraConv1D
    return LORA_LAYERS


def wrapper_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA class for this module's type (or a registered parent type), None if unsupported."""
    registry = _registry()
    for cls in type(module).__mro__:
        if cls in registry:
            return registry[cls]
    return None


def supported_types() -> str:
    """The supported module type names, for error messages."""
    return ", ".join(sorted({t.__name__ for t in _registry()}))


def with_lora(module: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> LoraLayer:
    """Wrap one layer with LoRA; the base is frozen, lora_A/lora_B train.

    Example:
        >>> layer = with_lora(nn.Linear(32, 64), LoraConfig(rank=4, alpha=8.0))
        >>> layer(torch.zeros(2, 32)).shape
        torch.Size([2, 64])
    """
    if isinstance(module, LoraLayer):
        raise LoraStateError(f"{type(module).__name__} already has LoRA; wrapping it again is not allowed")
    wrapper = wrapper_for(module)
    if wrapper is None:
        raise TypeError(f"LoRA does not support {type(module).__name__}; supported types: {supported_types()}")
    return wrapper(module, config, adapter_name)
