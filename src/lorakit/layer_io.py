"""One LoRA layer's own adapter file (`LoraLayer.save_adapter` / `load_adapter`): read -> plan (every check) ->
attach, as `loading.load_adapters` does for a model. The file format itself is `files.layer_file`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import Tensor, nn

from . import bases
from .adapter_set import AdapterSet
from .config import LoraBias, LoraConfig
from .errors import LoraFileError, LoraStateError
from .files import layer_file
from .files.checks import check_tensors, copy_into


class FileLayer(Protocol):
    """What a layer file reads on its layer (a `lorakit.layers.LoraLayer`), named here so that this module
    depends on no layer module: layers import it, never the reverse."""

    adapter_name: str | None
    merged: bool

    @property
    def base(self) -> nn.Module: ...

    @property
    def adapters(self) -> AdapterSet: ...


def layer_tensors(layer: FileLayer, *, exported: bool = False) -> dict[str, Tensor]:
    """A layer file's tensors for the active adapter: lora_A, lora_B, a variant's own (DoRA's lora_magnitude),
    and the bias it trains. `exported`: a PiSSA/OLoRA adapter as a plain LoRA for the original base."""
    if (name := layer.adapter_name) is None:
        raise LoraStateError("the layer has no active adapter to take tensors from; activate one first")
    A, B, config = layer.adapters.exported_factors(name) if exported else layer.adapters.factors(name)
    out = {**layer.adapters.tensors(name), "lora_A": A, "lora_B": B}
    if config.bias is not LoraBias.NONE and (bias := bases.own_bias(layer.base)) is not None:
        out["bias"] = bias
    return out


def save_layer_adapter(layer: FileLayer, path: str | Path) -> Path:
    """Write `layer`'s active adapter (`layer_tensors`, exported) with its config in the metadata; returns the path."""
    if layer.adapter_name is None:
        raise LoraStateError("the layer has no active adapter to save; activate one first")
    _, _, config = layer.adapters.exported_factors(
        layer.adapter_name
    )  # PiSSA/OLoRA: a rank-2r LoRA for the original base
    return layer_file.write_layer_file(
        path, layer_tensors(layer, exported=True), config, type(layer).__name__, tuple(bases.weight(layer.base).shape)
    )


def load_layer_adapter(layer: FileLayer, path: str | Path, *, allow_nonfinite: bool = False) -> None:
    """Load a `save_layer_adapter` file into `layer`'s active adapter; checked in full before anything is copied."""
    path = layer_file.layer_path(path)
    tensors, config, layer_type = layer_file.read_layer_file(path)  # read
    name = _plan_layer_load(layer, path, tensors, config, layer_type, allow_nonfinite)  # plan (checks only)
    copy_into(tensors, layer_tensors(layer))  # attach
    layer.adapters.set_config(name, config)


def _plan_layer_load(
    layer: FileLayer, path: Path, tensors: dict[str, Tensor], config: LoraConfig, layer_type: str, allow_nonfinite: bool
) -> str:
    """Every check of a layer load (the layer's state, type, rank, bias mode, DoRA, then the tensors); the
    name of the active adapter, which the file loads into."""
    if layer.merged:
        raise LoraStateError(
            f"cannot load {path} into a layer merged in place: it would keep serving the merged "
            "weights; call unmerge_() first"
        )
    if (name := layer.adapter_name) is None:
        raise LoraStateError(f"cannot load {path}: the layer has no active adapter; activate one first")
    active = layer.adapters.config(name)
    if config.use_dora != active.use_dora:
        raise LoraFileError(f"{path}: adapter use_dora={config.use_dora}, layer use_dora={active.use_dora}")
    if layer_type != type(layer).__name__:
        raise LoraFileError(f"{path}: adapter is for a {layer_type}, this layer is a {type(layer).__name__}")
    if config.rank != active.rank:
        raise LoraFileError(f"{path}: adapter rank {config.rank} does not match the layer's rank {active.rank}")
    if config.bias is not active.bias:
        raise LoraFileError(f"{path}: adapter bias={str(config.bias)!r}, layer bias={str(active.bias)!r}")
    check_tensors(str(path), tensors, {k: tuple(t.shape) for k, t in layer_tensors(layer).items()}, allow_nonfinite)
    return name
