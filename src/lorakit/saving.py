"""Saving a model's adapter as a PEFT-layout directory (one layer's own file: `LoraLayer.save_adapter`).

adapter_config.json          PEFT's LoraConfig fields (files.peft_format.to_peft_config)
adapter_model.safetensors    per LoRA module its factors (+ DoRA magnitude, + the bias it trains); each
                             TrainedCopy (modules_to_save) and, under bias="model", every other bias
                             under its plain key; key names from files.peft_format
lorakit.json                 lorakit's sidecar (files.provenance): the base's fingerprint, the tensors' hashes
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from . import param_files
from .config import LoraBias, LoraConfig
from .errors import LoraFileError
from .files import atomic, expert_layout, provenance
from .files import safetensors as st
from .files.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    computation_fields,
    param_key,
    peft_key,
    plain_key,
    replaced_base_tensors,
    to_peft_config,
)
from .fingerprint import Fingerprints, base_fingerprint
from .layer_io import layer_tensors  # noqa: F401  (imported from here by tests/ and fuzz/)
from .layers import LoraLayer
from .model import lora_layers, own_bias, plain_biases
from .trained_copy import trained_copies


def adapter_factors(
    model: nn.Module, name: str | None = None, *, exported: bool = False
) -> dict[str, tuple[LoraLayer, Tensor, Tensor, LoraConfig]]:
    """Per wrapped module holding adapter `name` (None: each layer's active one): (layer, lora_A, lora_B, config).

    `exported`: the factors as saved, i.e. PiSSA/OLoRA adapters converted to a rank-2r LoRA for the original base.
    """
    out: dict[str, tuple[LoraLayer, Tensor, Tensor, LoraConfig]] = {}
    for module, layer in lora_layers(model).items():
        n = layer.adapter_name if name is None else name
        if n is not None and n in layer.adapters.names():
            out[module] = (layer, *(layer.adapters.exported_factors(n) if exported else layer.adapters.factors(n)))
    return out


def adapter_state_dict(
    model: nn.Module, name: str | None = None, *, exported: bool = True, flat: bool = True
) -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's key names (what `save_adapters` writes, where `load_adapters` copies).

    Per LoRA layer its factors (and DoRA magnitude); the biases its bias mode trains; every TrainedCopy's
    trained copy (modules_to_save) under the module's plain key, as PEFT saves it. `exported`: see `adapter_factors`.
    A LoraParam's factors sit under PEFT's nested keys (`param_files.holding`), in PEFT's current flat layout
    (`files.expert_layout`); with `flat=False` as the layer holds them (per expert: where a load copies).
    """
    out: dict[str, Tensor] = {}
    factors = adapter_factors(model, name, exported=exported)
    params = param_files.holding(lora_layers(model), name)
    for module, (layer, A, B, config) in factors.items():
        if module in params:
            owner, depth, _ = params[module]
            a, b = expert_layout.from_experts(A, B) if flat else (A, B)
            out[param_key(owner, depth, "lora_A")], out[param_key(owner, depth, "lora_B")] = a, b
            continue
        out[peft_key(module, "lora_A", layer.peft_layout)] = A
        out[peft_key(module, "lora_B", layer.peft_layout)] = B
        if config.use_dora:
            adapter = name or layer.adapter_name
            assert adapter is not None, "adapter_factors gives the layers that hold the adapter"
            out[peft_key(module, "lora_magnitude", layer.peft_layout)] = layer.adapters.tensors(adapter)[
                "lora_magnitude"
            ]
        if config.bias is not LoraBias.NONE and (bias := own_bias(layer.base)) is not None:
            out[peft_key(module, "bias", layer.peft_layout)] = bias
    if _bias_mode(factors) is LoraBias.MODEL:  # every other bias of the model trains too
        out.update({plain_key(module, "bias"): bias for module, bias in plain_biases(model).items()})
    for module, saved in trained_copies(model).items():
        out.update({plain_key(module, pname): p for pname, p in saved.trained.named_parameters()})
    return out


def _bias_mode(factors: dict[str, tuple[LoraLayer, Tensor, Tensor, LoraConfig]]) -> LoraBias:
    """The adapter's bias mode (one per adapter: `LoraConfig.for_module` keeps it)."""
    return next((LoraBias(config.bias) for *_, config in factors.values()), LoraBias.NONE)


def peft_config(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """adapter_config.json for adapter `name` (None: the active one), in PEFT's vocabulary."""
    factors = adapter_factors(model, name, exported=True)
    if not factors:
        what = "no LoRA layers; apply_lora first" if name is None else f"no adapter named {name!r}"
        raise LoraFileError(f"the model has {what}")
    params = param_files.holding(lora_layers(model), name)
    configs = {
        param_files.param_path(*params[module][::2]) if module in params else module: config
        for module, (_, _, _, config) in factors.items()
    }
    paths = {param_files.param_path(owner, layer) for owner, _, layer in params.values()}
    others = [n for n, _ in model.named_modules() if n and n not in configs]
    linears = [
        f
        for module, (layer, *_) in factors.items()
        if module not in params and (f := getattr(type(layer), "fan_in_fan_out", None)) is not None
    ]
    return to_peft_config(
        configs,
        others,
        fan_in_fan_out=bool(linears) and all(linears),
        modules_to_save=list(trained_copies(model)),
        name_or_path=getattr(getattr(model, "config", None), "name_or_path", None) or None,
        parameters=paths,
    )


def save_adapters(
    model: nn.Module, directory: str | Path, *, name: str | None = None, fingerprints: Fingerprints | None = None
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT layout) for adapter `name` (default: active).

    Beside them `lorakit.json` (`files.provenance`): the fingerprint of the base the adapter is for (each
    targeted module's frozen weight hashed) and the hashes of the tensors written, which loads check.

    Examples:
        >>> import tempfile, lorakit as lk
        >>> mlp = lk.apply_lora(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(rank=2), ["0"])
        >>> sorted(p.name for p in save_adapters(mlp, tempfile.mkdtemp()).iterdir())
        ['adapter_config.json', 'adapter_model.safetensors', 'lorakit.json']
    """
    directory = Path(directory)
    config, tensors = peft_config(model, name), adapter_state_dict(model, name)
    skip = replaced_base_tensors(tensors)  # what the adapter writes itself (trained biases, heads) is no base
    params = param_files.holding(lora_layers(model), name)  # a LoraParam's record is its parameter's
    targeted = [
        param_files.param_path(params[m][0], params[m][2]) if m in params else m for m in adapter_factors(model, name)
    ]
    base = base_fingerprint(model, targeted, fingerprints, skip=skip)
    with atomic.locked_dir(directory):  # a concurrent save or load of this directory sees one whole adapter
        st.write(directory / WEIGHTS_NAME, tensors, {"format": "pt"})
        atomic.write_json(directory / CONFIG_NAME, config)
        provenance.write(directory, base, tensors, computation_fields(config))
    return directory
