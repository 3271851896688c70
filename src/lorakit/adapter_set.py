"""Named adapters on one LoRA layer: which one is active, which wait, and every change between them.

The active adapter's tensors are the layer's own parameters (`lora_A`, `lora_B`, and a variant's own,
such as DoRA's `lora_magnitude`), so `"lora_" in name` finds exactly what trains; the others wait,
frozen, in `layer.stash`, one `Adapter` each. Switching rebinds parameters: no copies, no weight changes.
This is the one place that reads or writes a layer's `adapter_name`, `config`, bound tensors and stash.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any, Protocol

from torch import Tensor, nn

from .config import BASE_CHANGING_INITS, LoraBias, LoraConfig
from .errors import LoraAdapterNotFound, LoraStateError


class BaseInit(nn.Module, ABC):
    """What an init that changed the base (PiSSA/OLoRA, `lorakit.variants.base_init`) leaves on the layer:
    the name of the adapter it initialised, and how to save that adapter for the original base."""

    adapter: str
    source_fingerprint: dict[str, Any] | None = None  # the original base weight's record (`lorakit.fingerprint`)

    @abstractmethod
    def export(self, A: Tensor, B: Tensor, config: LoraConfig) -> tuple[Tensor, Tensor, LoraConfig]:
        """(A, B, config) trained from the init, as a plain LoRA for the original base weight."""


class AdapterHolder(Protocol):
    """What AdapterSet reads and writes on its layer (a `lorakit.layers.LoraLayer`), named here so that
    adapter_set.py depends on no layer module: layers import it, never the reverse."""

    adapter_name: str | None
    config: LoraConfig | None
    stash: nn.ModuleDict
    merged: bool
    base_init: BaseInit | None
    tensor_names: tuple[str, ...]
    variant: str

    @property
    def mixed(self) -> Any: ...

    @property
    def rank(self) -> int: ...

    def new_adapter(self, config: LoraConfig) -> dict[str, nn.Parameter]: ...


DEFAULT_ADAPTER = "default"
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def check_adapter_name(name: object) -> str:
    """Adapter names are short identifiers (letters, digits, '_' and '-'), usable as module keys."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise ValueError(f"adapter name {name!r} is invalid: expected letters, digits, '_' or '-'")
    if hasattr(nn.ModuleDict, name):
        raise ValueError(f"adapter name {name!r} is reserved (a torch.nn.Module attribute); choose another")
    return name


class Adapter(nn.Module):
    """A named adapter that is not the active one on its layer: frozen tensors (lora_A, lora_B, ...) and config."""

    def __init__(self, tensors: dict[str, nn.Parameter], config: LoraConfig) -> None:
        super().__init__()
        for key, p in tensors.items():
            p.requires_grad_(False)
            self.register_parameter(key, p)
        self.config = config

    def tensors(self) -> dict[str, nn.Parameter]:
        """Its tensors by key (lora_A, lora_B, and a variant's own)."""
        return {key: p for key, p in self._parameters.items() if p is not None}


class AdapterSet:
    """The named adapters of one layer, active first (a view: the state is the layer's, the rules are here).

    Examples:
        >>> import torch, lorakit as lk
        >>> layer = lk.with_lora(nn.Linear(4, 4), lk.LoraConfig(rank=2))
        >>> layer.adapters.add("other", lk.LoraConfig(rank=1))
        >>> layer.adapters.activate("other")
        >>> layer.adapters.names(), layer.rank
        (['other', 'default'], 1)
    """

    def __init__(self, layer: AdapterHolder) -> None:
        self.layer = layer

    @property
    def active(self) -> str | None:
        """The active adapter's name (None: the layer computes its base)."""
        return self.layer.adapter_name

    def names(self) -> list[str]:
        """Every adapter the layer holds, the active one first."""
        return ([self.active] if self.active is not None else []) + list(self.layer.stash)

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def tensors(self, name: str) -> dict[str, nn.Parameter]:
        """The named adapter's tensors by key (lora_A, lora_B, and a variant's own), active or waiting."""
        if name is not None and name == self.active:
            return {key: getattr(self.layer, key) for key in self.layer.tensor_names}
        return self._stashed(name).tensors()

    def config(self, name: str) -> LoraConfig:
        """The named adapter's config, active or waiting."""
        if name is not None and name == self.active:
            assert self.layer.config is not None, "an active adapter has a config (bind sets both)"
            return self.layer.config
        return self._stashed(name).config

    def factors(self, name: str) -> tuple[nn.Parameter, nn.Parameter, LoraConfig]:
        """(lora_A, lora_B, config) of the named adapter."""
        t = self.tensors(name)
        return t["lora_A"], t["lora_B"], self.config(name)

    def exported_factors(self, name: str) -> tuple[Tensor, Tensor, LoraConfig]:
        """(A, B, config) as saved: a PiSSA/OLoRA adapter as a plain LoRA for the ORIGINAL base (variants.base_init)."""
        A, B, config = self.factors(name)
        init = self.layer.base_init
        return (A, B, config) if init is None or name != init.adapter else init.export(A, B, config)

    def add(self, name: str, config: LoraConfig) -> None:
        """Add a named adapter, freshly initialised and waiting (inactive)."""
        check_adapter_name(name)
        self._refuse_in_mixed_batch("add an adapter")
        layer = self.layer
        if config.init in BASE_CHANGING_INITS or layer.base_init is not None:
            raise ValueError(
                "PiSSA/OLoRA change the base weight at init, so such an adapter cannot sit beside "
                "others on one base; save it (it is converted for the original base) and load that"
            )
        if name in self:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if config.variant != layer.variant:
            raise ValueError(
                f"adapter {name!r} is a {config.variant} adapter (use_dora={config.use_dora}) but this "
                f"{type(layer).__name__} holds {layer.variant} adapters; one layer holds one variant"
            )
        held = self.names()  # an adapter training biases is kept alone, so among two or more none does
        lone = [self.config(held[0])] if len(held) == 1 else []
        if any(c.bias is not LoraBias.NONE for c in [config, *lone]):
            raise ValueError(
                "adapters with bias='all' or 'model' train the shared base bias, so they cannot sit "
                "beside other named adapters; use bias='none'"
            )
        layer.stash[name] = Adapter(layer.new_adapter(config), config)

    def activate(self, name: str | None) -> None:
        """Make `name` the active adapter (trainable), the current one waiting; None leaves only the base."""
        if name == self.active:
            return
        self._refuse_in_mixed_batch("switch adapters")
        layer = self.layer
        if layer.merged:
            raise LoraStateError("cannot switch adapters while merged in place; call unmerge_() first")
        if name is not None:
            self._stashed(name)  # raises for an unknown name before anything changes
        if self.active is not None:
            layer.stash[self.active] = Adapter(self.tensors(self.active), self.config(self.active))
        if name is None:
            self.bind(None, {}, None)
        else:
            waiting = self._stashed(name)
            del layer.stash[name]
            tensors = waiting.tensors()
            for p in tensors.values():
                p.requires_grad_(True)
            self.bind(name, tensors, waiting.config)

    def bind(self, name: str | None, tensors: dict[str, nn.Parameter], config: LoraConfig | None) -> None:
        """Make `tensors` the layer's active parameters under `name` (None, {}, None: no active adapter)."""
        layer = self.layer
        for key in layer.tensor_names:
            setattr(layer, key, tensors.get(key))
        layer.adapter_name, layer.config = name, config

    def set_config(self, name: str, config: LoraConfig) -> None:
        """Replace a named adapter's config (alpha, dropout, ...) by a loaded one of the same rank and variant."""
        old = self.config(name)
        if config.rank != old.rank:
            raise ValueError(f"rank {config.rank} does not match adapter {name!r}'s rank {old.rank}")
        if config.use_dora != old.use_dora:
            raise ValueError(f"use_dora={config.use_dora} does not match adapter {name!r}'s use_dora={old.use_dora}")
        if name == self.active:
            self.layer.config = config
        else:
            self._stashed(name).config = config

    def delete(self, name: str) -> None:
        """Drop a named adapter; deleting the active one leaves the layer with none active."""
        self._refuse_in_mixed_batch("delete an adapter")
        if name is not None and name == self.active:
            if self.layer.merged:
                raise LoraStateError("cannot delete the merged adapter; call unmerge_() first")
            self.bind(None, {}, None)
        else:
            self._stashed(name)
            del self.layer.stash[name]

    def _stashed(self, name: str) -> Adapter:
        if name not in self.layer.stash:
            raise LoraAdapterNotFound(f"adapter {name!r} is not on this layer; it has {self.names()}")
        adapter = self.layer.stash[name]
        assert isinstance(adapter, Adapter), "the stash holds Adapters only"
        return adapter

    def _refuse_in_mixed_batch(self, what: str) -> None:
        if self.layer.mixed is not None:
            raise LoraStateError(
                f"cannot {what} inside a mixed_batch block: its rows' adapters are fixed when it "
                "starts; leave the block first"
            )
