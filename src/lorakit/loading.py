"""Loading adapters, strictly, in three steps that follow the data:

    read    parse the files once (files/): config and tensors; no model involved
    plan    decide where every tensor goes and check it all (keys, shapes, ranks, dtypes, values, model state);
            the model is only looked at
    attach  the one step that changes the model: wrap or add the adapter, then copy the checked tensors

So a bad file, or a model in the wrong state, leaves the model exactly as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from . import bases, param_files
from .adapters import active_adapter
from .config import LoraBias, LoraConfig
from .errors import LoraFileError, LoraStateError
from .files.checks import check_tensors, copy_into
from .files.peft_format import AdapterFile, peft_key, plain_key, read_adapter
from .fingerprint import Fingerprints, check_base
from .layers import (
    DEFAULT_ADAPTER,
    LoraLayer,
    base_of,
    check_adapter_name,
    supported_types,
    with_lora,
    wrapper_for,
)
from .model import (
    apply_lora,
    find_targets,
    lora_layers,
    module_names,
    modules_outside_layers,
    own_bias,
    plain_biases,
    rule_matches,
    set_module,
    trained_biases,
)
from .param_files import ParamTarget
from .param_layers import LoraParam
from .saving import adapter_factors, adapter_state_dict
from .trained_copy import TrainedCopy

APPLY, INTO, ADD = "apply", "into", "add"  # wrap a bare model / load into an adapter it has / add a named one


@dataclass(frozen=True)
class WrapTarget:
    """One module the adapter puts LoRA on: its LoRA class, its plain base layer, its config."""

    cls: type[LoraLayer]
    base: nn.Module
    config: LoraConfig


@dataclass(frozen=True)
class LoadPlan:
    """Everything `attach` does, decided and checked: how, into which adapter, where, and the tensors by key."""

    how: str  # APPLY, INTO or ADD
    adapter: str | None  # None: each layer's active adapter (INTO without a name)
    config: LoraConfig  # the adapter's own config (APPLY wraps with it)
    targets: dict[str, WrapTarget]  # module name -> what it gets
    copies: list[str]  # modules_to_save: trained in full, each a TrainedCopy after attach
    tensors: dict[str, Tensor]  # checked; exactly the keys attach fills (a LoraParam's as its layer holds them)
    params: dict[str, ParamTarget] = field(default_factory=dict)  # module name -> its adapted parameters
    notes: tuple[str, ...] = ()  # shown when the adapter is attached (a pre-0.19 expert layout converted)


def load_adapters(
    model: nn.Module,
    directory: str | Path,
    *,
    name: str | None = None,
    allow_nonfinite: bool = False,
    allow_base_mismatch: bool = False,
    fingerprints: Fingerprints | None = None,
) -> nn.Module:
    """Load a PEFT-layout adapter directory into `model`, strictly; returns the model.

    On a model without LoRA, the adapter's own config is applied first (targets, ranks, alphas), as
    PEFT's `from_pretrained` does. On a LoRA model the tensors load into the active adapter, or, with
    `name`, into that named adapter (a hot swap: in place, no re-wrapping), or, if the model has no
    adapter of that name, into a new inactive adapter beside the others (see `lorakit.adapters`).
    Every key, shape, rank, dtype and value is checked before anything changes; a model merged in place
    (`merge_`) is refused with `LoraStateError` (unmerge it first).

    Then the adapter's `lorakit.json` is checked (`lorakit.fingerprint.check_base`): a computation field of
    `adapter_config.json` (rank, alpha, rsLoRA, patterns, DoRA, targets, bias, modules_to_save) or a tensor
    changed since saving raises `LoraFileChanged`; a base other than the one it was saved for (any tensor the
    forward reads, or a config field that changes the computation) raises `LoraBaseMismatch` naming what
    differs (a `ProvenanceNote` warning instead with `allow_base_mismatch`). A PEFT-made adapter, without that
    file, loads with a `ProvenanceNote` that its base could not be checked. `fingerprints` (kept by the caller
    for this model) hashes the base once across loads and saves; without it each load hashes it again.

    Examples:
        >>> import copy, tempfile, lorakit as lk
        >>> base = nn.Sequential(nn.Linear(4, 4))
        >>> d = lk.save_adapters(lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=2), ["0"]), tempfile.mkdtemp())
        >>> type(load_adapters(base, d)[0]).__name__
        'LoraLinear'
        >>> load_adapters(nn.Sequential(nn.Linear(4, 4)), d)  # same shapes, other weights  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lorakit.errors.LoraBaseMismatch: ...: this adapter was saved for a different base: '0': weight values ...
    """
    if name is not None:
        check_adapter_name(name)
    file = read_adapter(directory)
    plan = plan_load(model, file, name, allow_nonfinite=allow_nonfinite)  # a damaged file is refused as such first
    check_base(model, file, allow_mismatch=allow_base_mismatch, fingerprints=fingerprints)
    attach(model, plan)
    return model


# -- plan: every decision and check; the model is only read ---------------------------------------


def plan_load(
    model: nn.Module, file: AdapterFile, name: str | None = None, *, allow_nonfinite: bool = False
) -> LoadPlan:
    """Where each tensor of `file` goes in `model`, fully checked; raises before anything could change."""
    _refuse_merged(model, "load adapters into")
    existing = lora_layers(model)
    known = {n for layer in existing.values() for n in layer.adapters.names()}
    how = APPLY if not existing else INTO if name is None or name in known else ADD
    copies = _modules_to_save(model, file.spec.modules_to_save)
    if how == ADD and copies:
        raise LoraFileError(
            f"{file.where}: an adapter with modules_to_save cannot sit beside other named adapters "
            "(those modules are shared); load it into a fresh base"
        )
    targets = _targets_into(model, file, name) if how == INTO else _targets_new(model, file, copies)
    if how == INTO:
        params = param_files.targets_into(model, file, name)
    else:
        params = param_files.targets_new(model, file, _excluded(file, copies))
    if how != APPLY:
        _check_shared_biases(model, file, name, targets)
    on_params = param_files.plan(model, file, params)  # refuses expert tensors that fit no layout, naming both
    shapes = {**_expected_shapes(model, file, targets, copies), **on_params.shapes}
    check_tensors(file.where, file.tensors, shapes, allow_nonfinite)
    adapter = (name or DEFAULT_ADAPTER) if how == APPLY else name
    tensors = {**file.tensors, **on_params.converted}
    return LoadPlan(how, adapter, file.spec.config, targets, copies, tensors, params, on_params.notes)


def _excluded(file: AdapterFile, copies: list[str]) -> list[str]:
    """The adapter's exclude rules, and modules_to_save with everything they hold."""
    return file.spec.exclude + [f"re:{re.escape(n)}(\\..*)?" for n in copies]


def _refuse_merged(model: nn.Module, what: str) -> None:
    merged = [n for n, layer in lora_layers(model).items() if layer.merged]
    if merged:
        raise LoraStateError(
            f"cannot {what} a model merged in place ({len(merged)} layers merged, e.g. "
            f"{merged[0]!r}): it would keep serving the merged weights; call unmerge_(model) first"
        )


def _targets_into(model: nn.Module, file: AdapterFile, name: str | None) -> dict[str, WrapTarget]:
    """Loading into an adapter the model has: every layer holding it, with the file's config for that module."""
    targets = {}
    for module, (layer, _, _, config) in adapter_factors(model, name).items():
        if isinstance(layer, LoraParam):  # param_files.targets_into
            continue
        cfg = file.spec.config.for_module(module)
        if cfg.rank != config.rank and peft_key(module, "lora_A", layer.peft_layout) in file.tensors:
            raise LoraFileError(
                f"{file.where}: module {module!r} has rank {cfg.rank} in the adapter but {config.rank} in the model"
            )
        if cfg.use_dora != config.use_dora:
            raise LoraFileError(
                f"{file.where}: module {module!r} has use_dora={cfg.use_dora} in the adapter but "
                f"{config.use_dora} in the model"
            )
        targets[module] = WrapTarget(type(layer), layer.base, cfg)
    return targets


def _targets_new(model: nn.Module, file: AdapterFile, copies: list[str]) -> dict[str, WrapTarget]:
    """A new adapter: the modules its target rules select (modules_to_save and what they hold excluded)."""
    if not file.spec.targets and file.spec.target_parameters:  # PEFT's target_modules [] beside parameters
        return {}
    try:
        modules = find_targets(model, file.spec.targets, exclude=_excluded(file, copies))
    except ValueError as e:
        raise LoraFileError(f"{file.config_path}: {e}") from None
    targets = {}
    for module in modules:
        m = model.get_submodule(module)
        cfg = file.spec.config.for_module(module)
        cls, base = (type(m), m.base) if isinstance(m, LoraLayer) else (wrapper_for(m, cfg.variant), m)
        if cls is None:
            raise LoraFileError(
                f"{file.where}: target {module!r} is a {type(m).__name__}, which "
                f"{'DoRA' if cfg.use_dora else 'LoRA'} does not support "
                f"(supported: {supported_types(cfg.variant)})"
            )
        if cls.variant != cfg.variant:
            raise LoraFileError(
                f"{file.where}: module {module!r} holds {cls.variant} adapters; this one is "
                f"{cfg.variant} (use_dora={cfg.use_dora}), and one layer holds one variant"
            )
        targets[module] = WrapTarget(cls, base, cfg)
    return targets


def _check_shared_biases(model: nn.Module, file: AdapterFile, name: str | None, targets: dict[str, WrapTarget]) -> None:
    """A trained bias belongs to the base, which every named adapter shares: such an adapter must be alone."""
    bias = file.spec.config.bias
    for module, layer in lora_layers(model).items():
        if module not in targets and bias is not LoraBias.MODEL:  # "model" trains every bias, not only the targets'
            continue
        held, own = layer.adapters.names(), name or layer.adapter_name
        others = len(held) - (own in held)
        # an adapter that trains biases is always alone on its layer (this check and AdapterSet.add keep it so): only a
        # lone other adapter can be one, and looking no further keeps a load's cost flat in the adapters held
        lone = [n for n in held if n != own] if others == 1 else []
        biased = [n for n in lone if layer.adapters.config(n).bias is not LoraBias.NONE]
        if others and (bias is not LoraBias.NONE or biased):
            raise LoraFileError(
                f"{file.where}: adapters that train biases (bias='all' or 'model') train the shared "
                f"base bias of {module!r}, so they cannot sit beside other named adapters "
                f"(it has {[n for n in held if n != own]})"
            )


def _expected_shapes(
    model: nn.Module, file: AdapterFile, targets: dict[str, WrapTarget], copies: list[str]
) -> dict[str, tuple[int, ...]]:
    """Every key the file must hold (and the optional ones it does hold), with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for module, target in targets.items():
        layout = target.cls.peft_layout
        try:
            adapter_shapes = target.cls.adapter_shapes(
                target.base, target.config
            )  # lora_A, lora_B (+ DoRA's magnitude)
        except TypeError as e:  # a layer type's own limits (e.g. grouped convolutions)
            raise LoraFileError(f"{file.where}: module {module!r}: {e}") from None
        for tensor, shape in adapter_shapes.items():
            shapes[peft_key(module, tensor, layout)] = shape
        if target.config.bias is not LoraBias.NONE and (bias := own_bias(target.base)) is not None:
            shapes[peft_key(module, "bias", layout)] = tuple(bias.shape)
    if file.spec.config.bias is LoraBias.MODEL:  # PEFT's bias="all": every other bias too
        for module, bias in plain_biases(model).items():
            if module not in targets:
                shapes[plain_key(module, "bias")] = tuple(bias.shape)
    for module in copies:
        saved = _saved(model, module).named_parameters()
        shapes.update({plain_key(module, pname): tuple(p.shape) for pname, p in saved})
    optional = _whole_embeddings(model, set(targets), copies)
    shapes.update({k: tuple(t.shape) for k, t in optional.items() if k in file.tensors})
    return shapes


def _saved(model: nn.Module, module: str) -> nn.Module:
    """The module whose values a modules_to_save entry holds: a TrainedCopy's copy, else the module itself."""
    m = model.get_submodule(module)
    return m.trained if isinstance(m, TrainedCopy) else m


def _whole_embeddings(model: nn.Module, wrapped: set[str], copies: list[str]) -> dict[str, Tensor]:
    """Weights PEFT saves in full when it targets embeddings or their vocabulary was resized: optional keys."""
    modules = dict(modules_outside_layers(model))  # one walk, not one per module, and not into the layers
    out = {peft_key(module, "base_weight"): bases.weight(base_of(modules[module])) for module in wrapped}
    names = {id(m): n for n, m in modules.items()}
    for get in ("get_input_embeddings", "get_output_embeddings"):
        emb = getattr(model, get)() if callable(getattr(model, get, None)) else None
        if not isinstance(emb, nn.Module) or isinstance(emb, TrainedCopy):
            continue
        module = names.get(id(emb))
        if module and module not in wrapped and module not in copies:
            if isinstance(emb, LoraLayer):
                out[peft_key(module, "base_weight")] = bases.weight(emb.base)
            else:
                out[plain_key(module, "weight")] = bases.weight(emb)
    return out


def _modules_to_save(model: nn.Module, rules: list[str]) -> list[str]:
    """Module names matching any rule (PEFT's modules_to_save semantics: name or suffix), outermost only."""
    if not rules:
        return []
    return [
        n
        for n in module_names(model)
        if any(rule_matches(r, n) for r in rules)
        and not any(rule_matches(r, n.rpartition(".")[0]) for r in rules if "." in n)
    ]


# -- attach: the only step that changes the model -------------------------------------------------


def attach(model: nn.Module, plan: LoadPlan) -> None:
    """Carry out a checked plan: wrap or add the adapter, set its configs, copy its tensors in."""
    if plan.how == APPLY:
        apply_lora(
            model,
            plan.config,
            [f"re:{re.escape(n)}" for n in plan.targets] if plan.targets or not plan.params else None,
            target_parameters=[f"re:{re.escape(f'{t.owner}.{p}')}" for t in plan.params.values() for p in t.params],
            modules_to_save=[f"re:{re.escape(n)}" for n in plan.copies],
            adapter_name=plan.adapter or DEFAULT_ADAPTER,  # plan_load names it
        )
    elif plan.how == ADD:
        _add_named(model, plan)
        param_files.attach_new(model, plan.params, plan.adapter or DEFAULT_ADAPTER, active_adapter(model))
    for module in plan.copies:
        if not isinstance(model.get_submodule(module), TrainedCopy):
            set_module(model, module, TrainedCopy(model.get_submodule(module)))
    layers = lora_layers(model)
    for module, target in plan.targets.items():
        adapter = plan.adapter or layers[module].adapter_name
        assert adapter is not None, "a plan without a name loads into active adapters only"
        layers[module].adapters.set_config(adapter, target.config)
    param_files.set_configs(model, plan.params, plan.adapter)
    if plan.how == INTO:
        for bias in trained_biases(model, plan.config.bias).values():
            bias.requires_grad_(True)
    destinations = {
        **adapter_state_dict(model, plan.adapter, exported=False, flat=False),
        **_whole_embeddings(model, set(plan.targets), plan.copies),
    }
    missing = plan.tensors.keys() - destinations.keys()
    assert not missing, f"planned keys without a place in the model: {sorted(missing)[:4]}"
    copy_into(plan.tensors, {k: destinations[k] for k in plan.tensors})
    param_files.show(plan.notes)


def _add_named(model: nn.Module, plan: LoadPlan) -> None:
    """A new inactive adapter `plan.adapter` on every planned module; newly wrapped ones keep the active adapter."""
    name = plan.adapter
    assert name is not None, "plan_load names the adapter it adds"
    active = active_adapter(model)
    for module, target in plan.targets.items():
        m = model.get_submodule(module)
        if isinstance(m, LoraLayer):
            m.adapters.add(name, target.config)
        else:
            layer = with_lora(m, target.config, adapter_name=name)
            set_module(model, module, layer)
            layer.adapters.activate(active if active in layer.adapters.names() else None)
