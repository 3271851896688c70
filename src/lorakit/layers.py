"""LoRA layers: each holds its frozen base plus the trainable factors `lora_A` and `lora_B`.

Dispatch is a registry {(module type, variant): layer class}; adding a layer type or a variant (DoRA, in
`lorakit.variants.dora`) is one class and one line. Which named adapter is active is `adapter_set.py`'s business;
how the base stores its weight is `bases.py`'s; a layer's own adapter file (`save_adapter`) is `layer_io.py`'s.
A model's adapter directory is `saving`/`loading`'s, which build on this module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from . import bases, ops
from .adapter_set import DEFAULT_ADAPTER, AdapterSet, BaseInit, check_adapter_name
from .config import BASE_CHANGING_INITS, LoraBias, LoraConfig
from .errors import LoraStateError
from .layer_io import layer_tensors, load_layer_adapter, save_layer_adapter
from .slot_stacks import SlotStacks

__all__ = [
    "DEFAULT_ADAPTER",
    "LoraConv",
    "LoraConv1D",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "base_of",
    "check_adapter_name",
    "layer_tensors",
    "load_layer_adapter",
    "save_layer_adapter",
    "with_lora",
]


class LoraLayer(nn.Module):
    """A frozen `base` and its adapters: the active one (`adapter_name`, `config`) as `lora_A` (r, d_in, ...) and
    `lora_B` (d_out, r, ...), the others frozen in `stash` (see `adapter_set`); with none active, the base alone.
    Subclasses say how the factors are shaped, how forward runs and how the weight delta is laid out.
    """

    tensor_names: tuple[str, ...] = ("lora_A", "lora_B")  # an adapter's tensors; a variant may add its own
    # bound by adapter_set.py, all four together; None while no adapter is active (the layer computes its base)
    adapter_name: str | None
    config: LoraConfig | None
    adapters: AdapterSet  # the named adapters (built once in __init__; a view over this layer's state)
    lora_A: nn.Parameter | None  # (r, d_in, ...)
    lora_B: nn.Parameter | None  # (d_out, r, ...)
    stash: nn.ModuleDict
    merged: bool
    disabled: bool
    slot_stacks: SlotStacks | None
    _unmerged_weight: Tensor | None
    base_init: BaseInit | None
    variant: str = "lora"  # its key in the registry beside the module type (LoraConfig.variant)
    peft_layout: str = "linear"  # which PEFT key names its tensors take (files.peft_format.SUFFIXES)
    supports_base_init: bool = False  # layer types that implement init="pissa"/"olora" set this
    fan_in_fan_out: bool = False  # True where the base stores its weight as (d_in, d_out) (GPT-2's Conv1D)

    def __init__(self, base: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        if config.rank_pattern or config.alpha_pattern:
            config = config.for_module("")
        self.check_target(base, config)
        self.base = base
        self.init_state(check_adapter_name(adapter_name), config)
        if config.init in BASE_CHANGING_INITS:  # PiSSA/OLoRA: A, B from W, the residual left in the base
            self.base_init = BASE_INITS[config.init](self, config)  # variants.base_init.init_from_base
        base.requires_grad_(False)  # last: a refused shape or rank above leaves the user's module as it was
        if config.bias is not LoraBias.NONE and (bias := bases.bias(base)) is not None:
            bias.requires_grad_(True)  # bias "all" and "model" train the wrapped layer's own bias

    def init_state(self, adapter_name: str, config: LoraConfig) -> None:
        """The state every layer starts with, `adapter_name` bound to a fresh adapter of `config` (`base` set)."""
        self.stash = nn.ModuleDict()
        self.merged, self.disabled = False, False  # disabled: set by lorakit.adapters.disable_adapters
        self.slot_stacks = None  # this layer's fixed slots while an AdapterTable serves it
        self._unmerged_weight = None  # the exact base weight while merged in place
        self.base_init = None  # PiSSA/OLoRA: the factors at init, whose product left the base
        self.adapters = AdapterSet(self)  # built once: every change to the named adapters goes through it
        self.adapters.bind(adapter_name, self.new_adapter(config), config)

    def merge_target(self) -> Tensor:
        """The tensor the adapter's delta applies to, as stored (what merge_ swaps and unmerge_ restores)."""
        return bases.weight(self.base)

    def stack_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of one slot's (A, B) at rank 1 in an AdapterTable's stacks (`lorakit.slot_stacks`)."""
        return self.factor_shapes(self.base, 1)

    def stack_lead(self) -> int:
        """How many dimensions come before the rank in a slot's factors (`SlotStacks`' lead): none here."""
        return 0

    @property
    def mixed(self) -> Tensor | None:
        """The running mixed batch's row -> slot index (None outside one; see `lorakit.adapter_table`)."""
        return None if self.slot_stacks is None else self.slot_stacks.index.slots

    @classmethod
    def check_target(cls, base: nn.Module, config: LoraConfig) -> None:
        """Raise where this class cannot wrap `base` with `config` (its variant, its init, the factors' shapes):
        what `__init__` checks before it changes anything, and `apply_lora` for every target before the first."""
        if config.variant != cls.variant:  # with_lora picks the class from the config
            raise ValueError(f"{cls.__name__} holds {cls.variant} adapters, not {config.variant}")
        if config.init in BASE_CHANGING_INITS and not cls.supports_base_init:
            raise TypeError(f"init={config.init!r} is supported on linear layers only, not {type(base).__name__}")
        cls.factor_shapes(base, config.rank)

    def new_adapter(self, config: LoraConfig) -> dict[str, nn.Parameter]:
        """Fresh tensors of an adapter of `config`: A as `config.init` says, B zero, in the base's dtype and device."""
        a_shape, b_shape = self.factor_shapes(self.base, config.rank)
        w = bases.dense_weight(self.base)  # a quantised base gives its compute dtype
        A = nn.Parameter(torch.empty(a_shape, dtype=w.dtype, device=w.device))
        B = nn.Parameter(torch.empty(b_shape, dtype=w.dtype, device=w.device))
        ops.init_factors_(A, B, config.init)
        return {"lora_A": A, "lora_B": B}

    # -- what subclasses define -------------------------------------------------------------------
    @classmethod
    def factor_shapes(cls, base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (lora_A, lora_B) for LoRA of `rank` beside `base`."""
        raise NotImplementedError

    @classmethod
    def adapter_shapes(cls, base: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
        """Shapes of an adapter's tensors beside `base`, by key: what an adapter file holds for it."""
        a_shape, b_shape = cls.factor_shapes(base, config.rank)
        return {"lora_A": a_shape, "lora_B": b_shape}

    def lora_forward(self, x: Tensor) -> Tensor:
        """base(x) + scaling · B(A(dropout(x)))."""
        raise NotImplementedError

    def weight_delta(self) -> Tensor:
        """scaling · B @ A in fp32, laid out like the base's weight (zero with no active adapter)."""
        if self.adapter_name is None:
            a_shape, b_shape = self.factor_shapes(self.base, 1)
            return torch.zeros(b_shape[0], *a_shape[1:], device=bases.weight(self.base).device)
        A, B, config = self.active_factors()
        return ops.delta_weight(A, B, config.scaling)

    def mixed_state(self, A: Tensor, B: Tensor, slots: Tensor, weights: Tensor | None = None) -> tuple[Tensor, ...]:
        """What `mixed_forward` takes after x, made once per row -> slot index from the stacks (`SlotStacks.state`):
        by default A (n, r, ...), B (n, d_out, r) pre-scaled and slots (batch,); with per-row compositions (slots
        and weights (batch, K)) B is each row's weighted and concatenated (batch, d_out, K·r) (`ops.weighted_rows`).
        """
        if weights is None:
            return A, B, slots
        return A, ops.weighted_rows(B, slots, weights), slots

    def mixed_forward(self, x: Tensor, *state: Tensor) -> Tensor:
        """base(x) + each batch row's own adapter (or weighted adapters), `state` from `mixed_state`."""
        raise NotImplementedError

    # -- shared behaviour -------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        """The active adapter's scaling."""
        return self.active_factors()[2].scaling

    @property
    def rank(self) -> int:
        """The active adapter's rank."""
        return self.active_factors()[2].rank

    def active_factors(self) -> tuple[nn.Parameter, nn.Parameter, LoraConfig]:
        """(lora_A, lora_B, config) of the active adapter; LoraStateError where none is active."""
        A, B, config = self.lora_A, self.lora_B, self.config
        if A is None or B is None or config is None:
            raise LoraStateError(f"the layer has no active adapter (it holds {list(self.stash)}); activate one")
        return A, B, config

    def forward(self, x: Tensor) -> Tensor:
        stacks = self.slot_stacks
        if stacks is not None and (slots := stacks.index.slots) is not None:
            if x.shape[0] != slots.shape[0]:
                raise LoraStateError(
                    f"mixed_batch was given {slots.shape[0]} rows (one adapter name per row) but the batch "
                    f"has {x.shape[0]} (the first dimension of a {tuple(x.shape)} input)"
                )
            return self.mixed_forward(x, *stacks.state(self, slots, stacks.index.weights))
        if self.merged or self.disabled or self.adapter_name is None:
            return self.base(x)
        return self.lora_forward(x)

    def merged_weight(self, weight: Tensor) -> Tensor:
        """`weight` + this adapter's delta, in fp32, checked finite, in `weight`'s dtype and layout."""
        return ops.merged_weight(weight, self.weight_delta())

    def merge(self) -> nn.Module:
        """A plain copy of the base with W + scaling·B@A (and the bias as trained); this layer is unchanged."""
        plain = bases.plain_copy(self.base)  # a quantised base exports dequantised
        if not self.merged:
            with torch.no_grad():
                w = bases.weight(plain)
                w.copy_(self.merged_weight(w))
        return plain.requires_grad_(False)

    def merge_(self) -> LoraLayer:
        """Merge in place for serving; `unmerge_()` restores the base weight bit for bit."""
        if self.merged:
            raise LoraStateError(f"{type(self).__name__} is already merged; call unmerge_() first")
        if bases.is_quantized(self.base):
            raise LoraStateError("a quantised base cannot be merged in place; merge() exports a dequantised layer")
        if self.mixed is not None:
            raise LoraStateError("cannot merge in place inside a mixed_batch block; leave the block first")
        w = self.merge_target()
        merged = self.merged_weight(w).contiguous()  # a new tensor
        # swap storages rather than clone + copy: the original tensor is kept as is, for an exact unmerge_
        self._unmerged_weight, w.data = w.data, merged
        self.merged = True
        return self

    def unmerge_(self) -> LoraLayer:
        """Undo `merge_()`: the base weight becomes exactly what it was."""
        if not self.merged:
            raise LoraStateError(f"{type(self).__name__} is not merged; nothing to unmerge")
        assert self._unmerged_weight is not None, "merge_ set the base weight aside"
        self.merge_target().data = self._unmerged_weight  # the very tensor merge_ set aside: bit for bit
        self._unmerged_weight = None
        self.merged = False
        return self

    def save_adapter(self, path: str | Path) -> Path:
        """Write the active adapter (`layer_tensors`) to `<path>.safetensors`, config in the metadata."""
        return save_layer_adapter(self, path)

    def load_adapter(self, path: str | Path, *, allow_nonfinite: bool = False) -> LoraLayer:
        """Load a file written by `save_adapter` into the active adapter; checked in full before anything is copied."""
        load_layer_adapter(self, path, allow_nonfinite=allow_nonfinite)
        return self

    def extra_repr(self) -> str:
        if (c := self.config) is None:
            return f"no active adapter, stashed={list(self.stash)}"
        return (
            f"adapter={self.adapter_name!r}, rank={c.rank}, alpha={c.alpha:g}, scaling={c.scaling:g}, "
            f"dropout={c.dropout:g}, merged={self.merged}"
        )


class LoraLinear(LoraLayer):
    """LoRA beside an nn.Linear: A (r, d_in), B (d_out, r)."""

    supports_base_init = True

    @classmethod
    def factor_shapes(cls, base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        d_out, d_in = bases.weight_shape(base, cls.fan_in_fan_out)
        return (rank, d_in), (d_out, rank)

    def _conv1d_gemm(self) -> bool:
        """Whether the base computes Conv1D's addmm on its stored (d_in, d_out) weight (the ops' fan_in_fan_out).

        The ops then do the same, so a fresh layer is exactly its base on any CPU; a quantised base computes
        F.linear on (d_out, d_in) whatever the original type.
        """
        return self.fan_in_fan_out and not bases.is_quantized(self.base)

    def lora_forward(self, x: Tensor) -> Tensor:
        A, B, config = self.active_factors()
        weight, decode = bases.linear_operand(self.base, self.fan_in_fan_out)
        s, p, ffo = config.scaling, config.dropout, self._conv1d_gemm()
        return ops.lora_linear(x, weight, bases.bias(self.base), A, B, s, p, self.training, ffo, decode)

    def weight_delta(self) -> Tensor:
        delta = super().weight_delta()  # (d_out, d_in)
        return delta.t() if self.fan_in_fan_out else delta

    def mixed_state(self, A: Tensor, B: Tensor, slots: Tensor, weights: Tensor | None = None) -> tuple[Tensor, ...]:
        return ops.mixed_rows(A, B, slots, weights)  # gathered once, not at every forward (a decode step is one token)

    def mixed_forward(self, x: Tensor, *state: Tensor) -> Tensor:
        At, Bt = state
        weight = bases.dense_weight(self.base, self.fan_in_fan_out)  # (d_out, d_in)
        return ops.lora_linear_mixed(x, weight, bases.bias(self.base), At, Bt, self._conv1d_gemm())

    def merged_weight(self, weight: Tensor) -> Tensor:
        if self.adapter_name is None:
            return super().merged_weight(weight)
        A, B, config = self.active_factors()
        if self.fan_in_fan_out:  # W (d_in, d_out) + s·(B A)ᵀ = W + s·Aᵀ Bᵀ
            return ops.merged_low_rank(weight, A.t(), B.t(), config.scaling)
        return ops.merged_low_rank(weight, B, A, config.scaling)


class LoraConv1D(LoraLinear):
    """LoRA beside transformers' GPT-2 style Conv1D, whose weight is stored (d_in, d_out)."""

    fan_in_fan_out = True


class LoraEmbedding(LoraLayer):
    """LoRA beside an nn.Embedding: A (r, num_embeddings), B (embedding_dim, r), as PEFT lays them out."""

    peft_layout = "embedding"
    base: nn.Embedding

    @classmethod
    def factor_shapes(cls, base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        num, dim = bases.weight(base).shape
        return (rank, num), (dim, rank)

    def lora_forward(self, ids: Tensor) -> Tensor:
        A, B, config = self.active_factors()  # dropout has no meaning on token ids (PEFT skips it too)
        return ops.lora_embedding(ids, self.base, A, B, config.scaling)

    def weight_delta(self) -> Tensor:
        return super().weight_delta().t()  # (num_embeddings, dim)

    def mixed_forward(self, ids: Tensor, *state: Tensor) -> Tensor:
        return ops.lora_embedding_mixed(ids, self.base, *state)


class LoraConv(LoraLayer):
    """LoRA beside nn.Conv1d/2d/3d: A is a conv with the base's kernel (r, d_in, *k), B a 1×1 conv (d_out, r, 1...)."""

    base: nn.modules.conv._ConvNd

    @classmethod
    def factor_shapes(cls, base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if base.groups != 1:
            raise TypeError(f"LoRA on a grouped convolution (groups={base.groups}) is not supported; expected groups=1")
        d_out, d_in, *kernel = bases.weight(base).shape
        return (rank, d_in, *kernel), (d_out, rank, *([1] * len(kernel)))

    def lora_forward(self, x: Tensor) -> Tensor:
        A, B, config = self.active_factors()
        return ops.lora_conv(x, self.base, A, B, config.scaling, config.dropout, self.training)

    def mixed_forward(self, x: Tensor, *state: Tensor) -> Tensor:
        return ops.lora_conv_mixed(x, self.base, *state)


# -- the registries variants plug into (`lorakit.variants.register`) --------------------------------
# A module type is a class, or its qualified name for a library's class imported only if the user does
# (transformers' Conv1D): the key matches any subclass too.
LORA_LAYERS: dict[tuple[type[nn.Module] | str, str], type[LoraLayer]] = {
    (nn.Linear, "lora"): LoraLinear,
    (nn.Embedding, "lora"): LoraEmbedding,
    (nn.Conv1d, "lora"): LoraConv,
    (nn.Conv2d, "lora"): LoraConv,
    (nn.Conv3d, "lora"): LoraConv,
    ("transformers.pytorch_utils.Conv1D", "lora"): LoraConv1D,
}

# init name -> fn(layer, config) that takes A, B from the layer's base weight, leaves the residual in the base
# and returns the module that remembers the initial factors (`lorakit.variants.register` fills both tables)
BASE_INITS: dict[str, Callable[[LoraLayer, LoraConfig], BaseInit]] = {}


def base_of(module: nn.Module) -> nn.Module:
    """The frozen base of a LoRA layer; any other module is its own base."""
    return module.base if isinstance(module, LoraLayer) else module


def wrapper_for(module: nn.Module, variant: str = "lora") -> type[LoraLayer] | None:
    """The layer class for this module's type (or a registered parent type) and variant, None if unsupported."""
    for cls in type(module).__mro__:
        for key in (cls, f"{cls.__module__}.{cls.__qualname__}"):
            if (key, variant) in LORA_LAYERS:
                return LORA_LAYERS[key, variant]
    return None


def supported_types(variant: str = "lora") -> str:
    """The module type names a variant supports, for error messages."""
    names = {t.__name__ if isinstance(t, type) else t.rpartition(".")[2] for t, v in LORA_LAYERS if v == variant}
    return ", ".join(sorted(names))


def layer_class(module: nn.Module, config: LoraConfig) -> type[LoraLayer]:
    """The layer class `with_lora` builds for `module` and `config`; TypeError listing the supported types."""
    wrapper = wrapper_for(module, config.variant)
    if wrapper is None:
        what = "DoRA (use_dora=True)" if config.use_dora else "LoRA"
        raise TypeError(
            f"{what} does not support {type(module).__name__}; supported types: {supported_types(config.variant)}"
        )
    return wrapper


def with_lora(module: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> LoraLayer:
    """Wrap one layer with LoRA (or the config's variant, e.g. DoRA); the base is frozen, the adapter trains.

    Examples:
        >>> layer = with_lora(nn.Linear(32, 64), LoraConfig(rank=4, alpha=8.0))
        >>> layer(torch.zeros(2, 32)).shape
        torch.Size([2, 64])
    """
    if isinstance(module, LoraLayer):
        raise LoraStateError(f"{type(module).__name__} already has LoRA; wrapping it again is not allowed")
    return layer_class(module, config)(module, config, adapter_name)
