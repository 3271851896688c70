"""Loading adapters, strictly: the config, every key, shape, rank, dtype and value is checked before anything is
copied, so a bad file leaves the model exactly as it was. Only JSON and safetensors are ever read.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from torch import Tensor, nn

from .config import LoraBias, LoraConfig
from .errors import LoraFileError
from .files import layer_file
from .files import safetensors as st
from .files.atomic import locked_dir
from .files.checks import check_tensors, copy_into
from .files.peft_format import (CONFIG_NAME, PREFIX, WEIGHTS_NAME, AdapterSpec, is_peft_copy, peft_key,
                                read_adapter_config)
from .layers import DEFAULT_ADAPTER, LoraLayer, check_adapter_name, with_lora, wrapper_for
from .model import apply_lora, find_targets, lora_layers, rule_matches, set_module
from .saving import adapter_slots


def load_layer_adapter(layer: LoraLayer, path: str | Path, *, allow_nonfinite: bool = False) -> None:
    """Load a `save_layer_adapter` file into `layer`; checked in full before anything is copied."""
    path = layer_file.layer_path(path)
    tensors, config, layer_type = layer_file.read_layer_file(path)
    if layer_type != type(layer).__name__:
        raise LoraFileError(f"{path}: adapter is for a {layer_type}, this layer is a {type(layer).__name__}")
    if config.rank != layer.rank:
        raise LoraFileError(f"{path}: adapter rank {config.rank} does not match the layer's rank {layer.rank}")
    if config.bias is not layer.config.bias:
        raise LoraFileError(f"{path}: adapter bias={config.bias.value!r}, layer bias={layer.config.bias.value!r}")
    if config.use_dora != layer.config.use_dora:
        raise LoraFileError(f"{path}: adapter use_dora={config.use_dora}, layer use_dora={layer.config.use_dora}")
    targets = layer.adapter_tensors()
    check_tensors(str(path), tensors, {k: tuple(t.shape) for k, t in targets.items()}, allow_nonfinite)
    copy_into(tensors, targets)
    layer.config = config


def load_adapters(model: nn.Module, directory: str | Path, *, name: str | None = None,
                  allow_nonfinite: bool = False) -> nn.Module:
    """Load a PEFT-layout adapter directory into `model`, strictly; returns the model.

    On a model without LoRA, the adapter's own config is applied first (targets, ranks, alphas), as
    PEFT's `from_pretrained` does. On a LoRA model the tensors load into the active adapter, or, with
    `name`, into that named adapter (a hot swap: in place, no re-wrapping), or, if the model has no
    adapter of that name, into a new inactive adapter beside the others (see `lorakit.adapters`).
    Every key, shape, rank, dtype and value is checked before anything changes.

    Example:
        >>> import tempfile, lorakit as lk
        >>> mlp = lk.apply_lora(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(rank=2), ["0"])
        >>> d = lk.save_adapters(mlp, tempfile.mkdtemp())
        >>> fresh = load_adapters(nn.Sequential(nn.Linear(4, 4)), d)
        >>> type(fresh[0]).__name__
        'LoraLinear'
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise LoraFileError(f"{directory}: not an adapter directory (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    if name is not None:
        check_adapter_name(name)
    with locked_dir(directory, exclusive=False):  # config and weights of one save, never of two
        spec = read_adapter_config(directory)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
            hint = f" ({', '.join(pickled)} is pickle, which lorakit never loads)" if pickled else ""
            raise LoraFileError(f"{weights}: no such file{hint}")
        tensors, _ = st.read(weights)
    where = str(weights)

    existing = lora_layers(model)
    known = {n for layer in existing.values() for n in layer.adapter_names()}
    into = bool(existing) and (name is None or name in known)  # load into an adapter the model already has
    plan: dict[str, tuple[type[LoraLayer], nn.Module, LoraConfig]] = {}
    if into:
        for module, (layer, A, _, config) in adapter_slots(model, name).items():
            cfg = spec.config.for_module(module)
            if cfg.rank != config.rank and peft_key(module, "lora_A", layer.peft_layout) in tensors:
                raise LoraFileError(f"{where}: module {module!r} has rank {cfg.rank} in the adapter but "
                                    f"{config.rank} in the model")
            if cfg.use_dora != config.use_dora:
                raise LoraFileError(f"{where}: module {module!r} has use_dora={cfg.use_dora} in the adapter but "
                                    f"{config.use_dora} in the model")
            plan[module] = (type(layer), layer.base, cfg)
    else:
        if existing and spec.modules_to_save:
            raise LoraFileError(f"{where}: an adapter with modules_to_save cannot sit beside other named adapters "
                                "(those modules are shared); load it into a fresh base")
        save_names = _names(model, spec.modules_to_save)
        exclude = spec.exclude + [f"re:{re.escape(n)}(\\..*)?" for n in save_names]
        try:
            modules = find_targets(model, spec.targets, exclude=exclude)
        except ValueError as e:
            raise LoraFileError(f"{directory / CONFIG_NAME}: {e}") from None
        for module in modules:
            m = model.get_submodule(module)
            cfg = spec.config.for_module(module)
            if isinstance(m, LoraLayer):
                if LoraBias.ALL in [cfg.bias] + [m.factors(n)[2].bias for n in m.adapter_names()]:
                    raise LoraFileError(f"{where}: adapters with bias='all' train the shared base bias of "
                                        f"{module!r}, so they cannot sit beside other named adapters")
                plan[module] = (type(m), m.base, cfg)
            elif wrapper_for(m) is None:
                raise LoraFileError(f"{where}: target {module!r} is a {type(m).__name__}, which LoRA does not support")
            else:
                plan[module] = (wrapper_for(m), m, cfg)

    shapes: dict[str, tuple[int, ...]] = {}
    for module, (cls, base, cfg) in plan.items():
        a_shape, b_shape = cls.factor_shapes(base, cfg.rank)
        shapes[peft_key(module, "lora_A", cls.peft_layout)] = a_shape
        shapes[peft_key(module, "lora_B", cls.peft_layout)] = b_shape
        if cfg.use_dora:
            if not cls.supports_dora:
                raise LoraFileError(f"{where}: module {module!r} is a {type(base).__name__}; lorakit's DoRA "
                                    "supports linear layers only")
            shapes[peft_key(module, "lora_magnitude", cls.peft_layout)] = (b_shape[0],)
        if cfg.bias is LoraBias.ALL and getattr(base, "bias", None) is not None:
            shapes[peft_key(module, "bias", cls.peft_layout)] = tuple(base.bias.shape)
    extra = _extra_tensors(model, spec, plan, tensors)  # modules_to_save, whole embeddings, PEFT's other biases
    shapes.update({k: tuple(t.shape) for k, t in extra.items()})
    tensors = {k: v for k, v in tensors.items() if k in shapes or not _peftcopy_into(k)}
    check_tensors(where, tensors, shapes, allow_nonfinite)

    # everything checked: change the model
    adapter = name
    if not existing:
        adapter = name or DEFAULT_ADAPTER
        apply_lora(model, spec.config, [f"re:{re.escape(n)}" for n in plan],
                   modules_to_save=[f"re:{re.escape(n)}" for n in _names(model, spec.modules_to_save)],
                   adapter_name=adapter)
    elif not into:
        active = Counter(layer.adapter_name for layer in existing.values()).most_common(1)[0][0]
        for module, (cls, base, cfg) in plan.items():
            m = model.get_submodule(module)
            if isinstance(m, LoraLayer):
                m.add_adapter(name, cfg)
            else:
                layer = with_lora(m, cfg, adapter_name=name)
                set_module(model, module, layer)
                layer.activate(active if active in layer.adapter_names() else None)
    destinations = dict(extra)
    for module, (layer, A, B, config) in adapter_slots(model, adapter).items():
        destinations[peft_key(module, "lora_A", layer.peft_layout)] = A
        destinations[peft_key(module, "lora_B", layer.peft_layout)] = B
        if config.use_dora:
            destinations[peft_key(module, "lora_magnitude", layer.peft_layout)] = layer.magnitude(adapter or layer.adapter_name)
        if peft_key(module, "bias", layer.peft_layout) in shapes:
            destinations[peft_key(module, "bias", layer.peft_layout)] = layer.base.bias
        layer.set_adapter_config(adapter or layer.adapter_name, plan[module][2])
    assert destinations.keys() == shapes.keys(), "planned and wrapped modules differ"
    copy_into(tensors, destinations)
    return model


def _peftcopy_into(key: str) -> bool:
    """PEFT's bookkeeping copies of modules_to_save (the plain key carries the trained value)."""
    return ".original_module." in key or ".modules_to_save." in key


def _extra_tensors(model: nn.Module, spec: AdapterSpec, plan: dict, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Model tensors an adapter file may also carry, by key: modules_to_save, whole embeddings, other biases."""
    extra: dict[str, Tensor] = {}
    for module in _names(model, spec.modules_to_save):
        for pname, p in model.get_submodule(module).named_parameters():
            extra[f"{PREFIX}{module}.{pname}"] = p
    # PEFT saves whole embedding matrices when it targets them (resized vocabularies): optional
    optional = {f"{PREFIX}{module}.base_layer.weight": base.weight for module, (_, base, _) in plan.items()}
    for get in ("get_input_embeddings", "get_output_embeddings"):
        emb = getattr(model, get)() if callable(getattr(model, get, None)) else None
        module = next((n for n, m in model.named_modules() if m is emb), None) if emb is not None else None
        if module and module not in plan:
            if isinstance(emb, LoraLayer):
                optional[f"{PREFIX}{module}.base_layer.weight"] = emb.base.weight
            else:
                optional[f"{PREFIX}{module}.weight"] = emb.weight
    if spec.config.bias is LoraBias.ALL:  # PEFT's bias="all" also saves biases of modules without LoRA
        params = dict(model.named_parameters())
        for key in tensors:
            pname = key[len(PREFIX):]
            if key.startswith(PREFIX) and key.endswith(".bias") and not _peftcopy_into(key) and pname in params:
                optional.setdefault(key, params[pname])
    extra.update({k: t for k, t in optional.items() if k in tensors and k not in extra})
    return extra


def _names(model: nn.Module, rules: list[str]) -> list[str]:
    """Module names matching any rule (PEFT's modules_to_save semantics: name or suffix)."""
    if not rules:
        return []
    return [n for n, _ in model.named_modules() if n and any(rule_matches(r, n) for r in rules)
            and not any(rule_matches(r, n.rpartition(".")[0]) for r in rules if "." in n)]
