"""Saving adapters: one layer to its own file, or a model's adapter as a PEFT-layout directory.

    adapter_config.json          PEFT's LoraConfig fields (peft_type, r, lora_alpha, target_modules, ...)
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight / .lora_B.weight
                                 (embeddings: .lora_embedding_A / .lora_embedding_B; bias: .base_layer.bias)
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from .config import LoraBias, LoraConfig
from .errors import LoraFileError
from .files import atomic, layer_file
from .files import safetensors as st
from .files.peft_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME, peft_key, to_peft_config
from .layers import LoraLayer
from .model import lora_layers


def save_layer_adapter(layer: LoraLayer, path: str | Path) -> Path:
    """Write one layer's adapter (lora_A, lora_B, bias under "all") with its config in the metadata."""
    tensors, config = layer.adapter_tensors(), layer.config
    if layer.adapter_name is not None:  # PiSSA/OLoRA: saved as a rank-2r LoRA for the original base
        A, B, config = layer.exported_factors(layer.adapter_name)
        tensors.update(lora_A=A, lora_B=B)
    return layer_file.write_layer_file(path, tensors, config, type(layer).__name__, tuple(layer.base_weight.shape))



def adapter_slots(model: nn.Module, name: str | None = None, *,
                  exported: bool = False) -> dict[str, tuple[LoraLayer, Tensor, Tensor, LoraConfig]]:
    """Per wrapped module holding adapter `name` (None: each layer's active one): (layer, lora_A, lora_B, config).

    `exported`: the factors as saved, i.e. PiSSA/OLoRA adapters converted to a rank-2r LoRA for the original base.
    """
    out = {}
    for module, layer in lora_layers(model).items():
        n = layer.adapter_name if name is None else name
        if n is not None and n in layer.adapter_names():
            out[module] = (layer, *(layer.exported_factors(n) if exported else layer.factors(n)))
    return out


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's key names (what `save_adapters` writes)."""
    out: dict[str, Tensor] = {}
    for module, (layer, A, B, config) in adapter_slots(model, name, exported=True).items():
        out[peft_key(module, "lora_A", layer.peft_layout)] = A
        out[peft_key(module, "lora_B", layer.peft_layout)] = B
        if config.use_dora:
            out[peft_key(module, "lora_magnitude", layer.peft_layout)] = layer.magnitude(name or layer.adapter_name)
        if config.bias is LoraBias.ALL and getattr(layer.base, "bias", None) is not None:
            out[peft_key(module, "bias", layer.peft_layout)] = layer.base.bias
    for module in getattr(model, "lorakit_modules_to_save", ()):
        for pname, p in model.get_submodule(module).named_parameters():
            out[f"{PREFIX}{module}.{pname}"] = p
    return out


def peft_config(model: nn.Module, name: str | None = None) -> dict:
    """adapter_config.json for adapter `name` (None: the active one), in PEFT's vocabulary."""
    slots = adapter_slots(model, name, exported=True)
    if not slots:
        what = "no LoRA layers; apply_lora first" if name is None else f"no adapter named {name!r}"
        raise LoraFileError(f"the model has {what}")
    configs = {module: config for module, (_, _, _, config) in slots.items()}
    others = [n for n, _ in model.named_modules() if n and n not in configs]
    linears = [type(layer).fan_in_fan_out for layer, *_ in slots.values() if hasattr(type(layer), "fan_in_fan_out")]
    return to_peft_config(configs, others, fan_in_fan_out=bool(linears) and all(linears),
                          modules_to_save=list(getattr(model, "lorakit_modules_to_save", ())),
                          name_or_path=getattr(getattr(model, "config", None), "name_or_path", None) or None)


def save_adapters(model: nn.Module, directory: str | Path, *, name: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT layout) for adapter `name` (default: active).

    Example:
        >>> import tempfile, lorakit as lk
        >>> mlp = lk.apply_lora(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(rank=2), ["0"])
        >>> sorted(p.name for p in save_adapters(mlp, tempfile.mkdtemp()).iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    directory = Path(directory)
    config, tensors = peft_config(model, name), adapter_state_dict(model, name)
    with atomic.locked_dir(directory):  # a concurrent save or load of this directory sees one whole adapter
        st.write(directory / WEIGHTS_NAME, tensors, {"format": "pt"})
        atomic.write_json(directory / CONFIG_NAME, config)
    return directory
