"""Adapter files: one layer's `.safetensors`, and the model-level directory in Hugging Face PEFT's layout.

    adapter_config.json          PEFT's LoraConfig fields (peft_type, r, lora_alpha, target_modules, ...)
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight / .lora_B.weight
                                 (embeddings: .lora_embedding_A / .lora_embedding_B; bias: .base_layer.bias)

Loading is strict: the config, every key, shape, rank, dtype and value is checked before anything is
copied, so a bad file leaves the model exactly as it was. Only JSON and safetensors are ever read.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from . import safetensors_io
from .config import LoraBias, LoraConfig
from .errors import LoraFileError
from .layers import DEFAULT_ADAPTER, LoraEmbedding, LoraLayer, check_adapter_name, with_lora, wrapper_for
from .model import apply_lora, find_targets, lora_layers, rule_matches, set_module
from .peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterSpec, read_adapter_config, to_peft_config  # noqa: F401

PREFIX = "base_model.model."
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)



# -- one layer: <path>.safetensors -----------------------------------------------------------------

def _layer_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def save_layer_adapter(layer: LoraLayer, path: str | Path) -> Path:
    """Write one layer's adapter (lora_A, lora_B, bias under "all") with its config in the metadata."""
    path = _layer_path(path)
    tensors, config = layer.adapter_tensors(), layer.config
    if layer.adapter_name is not None:  # PiSSA/OLoRA: saved as a rank-2r LoRA for the original base
        A, B, config = layer.exported_factors(layer.adapter_name)
        tensors.update(lora_A=A, lora_B=B)
    meta = {"format": "lorakit-layer", "layer": type(layer).__name__, "config": json.dumps(config.to_dict()),
            "base_weight_shape": json.dumps(list(layer.base_weight.shape))}
    safetensors_io.write(path, tensors, meta)
    return path


def load_layer_adapter(layer: LoraLayer, path: str | Path, *, allow_nonfinite: bool = False) -> None:
    """Load a `save_layer_adapter` file into `layer`; checked in full before anything is copied."""
    path = _layer_path(path)
    tensors, meta = safetensors_io.read(path)
    if meta.get("format") != "lorakit-layer":
        raise LoraFileError(f"{path}: not a lorakit layer adapter (metadata format={meta.get('format')!r})")
    try:
        config = LoraConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise LoraFileError(f"{path}: the config in the metadata is invalid ({e})") from None
    if meta.get("layer") != type(layer).__name__:
        raise LoraFileError(f"{path}: adapter is for a {meta.get('layer')}, this layer is a {type(layer).__name__}")
    if config.rank != layer.rank:
        raise LoraFileError(f"{path}: adapter rank {config.rank} does not match the layer's rank {layer.rank}")
    if config.bias is not layer.config.bias:
        raise LoraFileError(f"{path}: adapter bias={config.bias.value!r}, layer bias={layer.config.bias.value!r}")
    if config.use_dora != layer.config.use_dora:
        raise LoraFileError(f"{path}: adapter use_dora={config.use_dora}, layer use_dora={layer.config.use_dora}")
    targets = layer.adapter_tensors()
    _check_tensors(str(path), tensors, {k: tuple(t.shape) for k, t in targets.items()}, allow_nonfinite)
    _copy(tensors, targets)
    layer.config = config


# -- the model: PEFT's directory layout -------------------------------------------------------------

def _peft_suffixes(layer_cls: type[LoraLayer]) -> dict[str, str]:
    """Our tensor name -> PEFT's key suffix for one layer type."""
    if issubclass(layer_cls, LoraEmbedding):
        return {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B", "bias": "base_layer.bias"}
    return {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "bias": "base_layer.bias",
            "lora_magnitude": "lora_magnitude_vector"}  # DoRA's m, as PEFT 0.21 saves it


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
        out[_key(module, "lora_A", type(layer))] = A
        out[_key(module, "lora_B", type(layer))] = B
        if config.use_dora:
            out[_key(module, "lora_magnitude", type(layer))] = layer.magnitude(name or layer.adapter_name)
        if config.bias is LoraBias.ALL and getattr(layer.base, "bias", None) is not None:
            out[_key(module, "bias", type(layer))] = layer.base.bias
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
        >>> import tempfile
        >>> mlp = apply_lora(nn.Sequential(nn.Linear(4, 4)), LoraConfig(rank=2), ["0"])
        >>> sorted(p.name for p in save_adapters(mlp, tempfile.mkdtemp()).iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    directory = Path(directory)
    config = peft_config(model, name)
    safetensors_io.write(directory / WEIGHTS_NAME, adapter_state_dict(model, name), {"format": "pt"})
    safetensors_io.atomic_write(directory / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    return directory


def load_adapters(model: nn.Module, directory: str | Path, *, name: str | None = None,
                  allow_nonfinite: bool = False) -> nn.Module:
    """Load a PEFT-layout adapter directory into `model`, strictly; returns the model.

    On a model without LoRA, the adapter's own config is applied first (targets, ranks, alphas), as
    PEFT's `from_pretrained` does. On a LoRA model the tensors load into the active adapter, or, with
    `name`, into that named adapter (a hot swap: in place, no re-wrapping), or, if the model has no
    adapter of that name, into a new inactive adapter beside the others (see `lorakit.adapters`).
    Every key, shape, rank, dtype and value is checked before anything changes.

    Example:
        >>> import tempfile
        >>> mlp = apply_lora(nn.Sequential(nn.Linear(4, 4)), LoraConfig(rank=2), ["0"])
        >>> d = save_adapters(mlp, tempfile.mkdtemp())
        >>> fresh = load_adapters(nn.Sequential(nn.Linear(4, 4)), d)
        >>> type(fresh[0]).__name__
        'LoraLinear'
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise LoraFileError(f"{directory}: not an adapter directory (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    if name is not None:
        check_adapter_name(name)
    spec = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = f" ({', '.join(pickled)} is pickle, which lorakit never loads)" if pickled else ""
        raise LoraFileError(f"{weights}: no such file{hint}")
    tensors, _ = safetensors_io.read(weights)
    where = str(weights)

    existing = lora_layers(model)
    known = {n for layer in existing.values() for n in layer.adapter_names()}
    into = bool(existing) and (name is None or name in known)  # load into an adapter the model already has
    plan: dict[str, tuple[type[LoraLayer], nn.Module, LoraConfig]] = {}
    if into:
        for module, (layer, A, _, config) in adapter_slots(model, name).items():
            cfg = spec.config.for_module(module)
            if cfg.rank != config.rank and _key(module, "lora_A", type(layer)) in tensors:
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
        shapes[_key(module, "lora_A", cls)] = a_shape
        shapes[_key(module, "lora_B", cls)] = b_shape
        if cfg.use_dora:
            if not cls.supports_dora:
                raise LoraFileError(f"{where}: module {module!r} is a {type(base).__name__}; lorakit's DoRA "
                                    "supports linear layers only")
            shapes[_key(module, "lora_magnitude", cls)] = (b_shape[0],)
        if cfg.bias is LoraBias.ALL and getattr(base, "bias", None) is not None:
            shapes[_key(module, "bias", cls)] = tuple(base.bias.shape)
    extra = _extra_tensors(model, spec, plan, tensors)  # modules_to_save, whole embeddings, PEFT's other biases
    shapes.update({k: tuple(t.shape) for k, t in extra.items()})
    tensors = {k: v for k, v in tensors.items() if k in shapes or not _peft_copy(k)}
    _check_tensors(where, tensors, shapes, allow_nonfinite)

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
        destinations[_key(module, "lora_A", type(layer))] = A
        destinations[_key(module, "lora_B", type(layer))] = B
        if config.use_dora:
            destinations[_key(module, "lora_magnitude", type(layer))] = layer.magnitude(adapter or layer.adapter_name)
        if _key(module, "bias", type(layer)) in shapes:
            destinations[_key(module, "bias", type(layer))] = layer.base.bias
        layer.set_adapter_config(adapter or layer.adapter_name, plan[module][2])
    assert destinations.keys() == shapes.keys(), "planned and wrapped modules differ"
    _copy(tensors, destinations)
    return model


def _peft_copy(key: str) -> bool:
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
            if key.startswith(PREFIX) and key.endswith(".bias") and not _peft_copy(key) and pname in params:
                optional.setdefault(key, params[pname])
    extra.update({k: t for k, t in optional.items() if k in tensors and k not in extra})
    return extra


def _names(model: nn.Module, rules: list[str]) -> list[str]:
    """Module names matching any rule (PEFT's modules_to_save semantics: name or suffix)."""
    if not rules:
        return []
    return [n for n, _ in model.named_modules() if n and any(rule_matches(r, n) for r in rules)
            and not any(rule_matches(r, n.rpartition(".")[0]) for r in rules if "." in n)]


def _key(name: str, tensor: str, cls: type[LoraLayer]) -> str:
    return f"{PREFIX}{name}.{_peft_suffixes(cls)[tensor]}"


def _check_tensors(where: str, tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]],
                   allow_nonfinite: bool) -> None:
    """Every expected key present, nothing unexpected, shapes equal, floating dtypes, finite values."""
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_few(unexpected)}")
        raise LoraFileError(f"{where}: adapter does not fit the model; " + "; ".join(parts))
    for key, shape in shapes.items():
        t = tensors[key]
        if t.dtype not in FLOAT_DTYPES:
            raise LoraFileError(f"{where}: {key} has dtype {t.dtype}; expected a floating dtype")
        if tuple(t.shape) != tuple(shape):
            raise LoraFileError(f"{where}: {key} has shape {tuple(t.shape)}; the model expects {tuple(shape)} "
                                "(an adapter for a different base, or another rank?)")
        if not allow_nonfinite and not torch.isfinite(t).all():
            raise LoraFileError(f"{where}: {key} holds NaN or Inf values (pass allow_nonfinite=True to load anyway)")


def _few(keys: list[str], k: int = 6) -> str:
    return ", ".join(keys[:k]) + (f", ... (+{len(keys) - k})" if len(keys) > k else "")


def _copy(tensors: dict[str, Tensor], targets: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for key, dst in targets.items():
            dst.copy_(tensors[key].to(dst.dtype))
