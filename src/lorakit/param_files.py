"""LoRA on parameters (`LoraParam`, target_parameters) in PEFT's adapter files: where each parameter's factors sit,
in which layout, and how they reach the layers; `saving` and `loading` call it for their LoraParam layers.

PEFT nests the wrappers of one module's adapted parameters, the first registered innermost, and keys each by its
depth (`files.peft_format.param_key`); lorakit nests its LoraParams the same way, so a parameter's depth is the
number of LoraParams holding the adapter that wrap it. The tensors themselves are converted by
`files.expert_layout`: PEFT's flat factors <-> lorakit's per-expert ones, the pre-0.19 layout on load with a note.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from .config import LoraConfig
from .errors import LayoutNote, LoraFileError
from .files import expert_layout
from .files.expert_layout import LEGACY, ParamGeometry
from .files.peft_format import AdapterFile, param_key
from .layers import LoraLayer
from .model import lora_layers, modules_outside_layers, set_module
from .param_layers import LoraParam, with_param_lora
from .param_targets import find_parameters


@dataclass(frozen=True)
class ParamTarget:
    """One module's parameters an adapter adapts: their names in registration order, and the adapter's config."""

    owner: str  # the module's name in the model (where its outermost LoraParam sits)
    params: tuple[str, ...]
    config: LoraConfig

    def keys(self, tensor: str) -> dict[str, str]:
        """PEFT's key of `tensor` ("lora_A", "lora_B") for each parameter, by parameter name."""
        n = len(self.params)
        return {p: param_key(self.owner, n - 1 - i, tensor) for i, p in enumerate(self.params)}


@dataclass(frozen=True)
class ParamPlan:
    """What a load does for LoRA on parameters: expected file shapes, tensors converted to lorakit's factors,
    and the notes to show (a pre-0.19 layout converted)."""

    shapes: dict[str, tuple[int, ...]]
    converted: dict[str, Tensor]
    notes: tuple[str, ...]


def owner_of(model: nn.Module, owner: str) -> nn.Module:
    """The real module named `owner` (under the LoraParams wrapping it, if any)."""
    m = model.get_submodule(owner)
    return m.owner if isinstance(m, LoraParam) else m


def geometry(module: nn.Module, param: str) -> ParamGeometry:
    """How PEFT's files lay out LoRA on `module.<param>`: its shape, and whether the module computes x @ P[e]."""
    p = module._parameters[param]
    assert p is not None, "select_params picks parameters the module holds"
    return ParamGeometry(tuple(p.shape), bool(getattr(module, "is_transposed", False)) and p.dim() == 3)


def holding(layers: dict[str, LoraLayer], name: str | None) -> dict[str, tuple[str, int, LoraParam]]:
    """Each LoraParam of `layers` (`lora_layers`) holding adapter `name` (None: its active one), by its name
    there: (owner module name, PEFT depth, layer). Depth counts the LoraParams wrapping it that hold it too."""
    out = {}
    for outer_name, outer in layers.items():
        if not isinstance(outer, LoraParam) or _is_nested(layers, outer_name):
            continue
        chain = outer.chain()  # outermost first
        for i, layer in enumerate(chain):
            if _holds(layer, name):
                out[outer_name + ".base" * i] = (outer_name, sum(_holds(w, name) for w in chain[:i]), layer)
    return out


def _holds(layer: LoraParam, name: str | None) -> bool:
    wanted = layer.adapter_name if name is None else name
    return wanted is not None and wanted in layer.adapters.names()


def _is_nested(layers: dict[str, LoraLayer], name: str) -> bool:
    """Whether the LoraParam `name` sits inside another (listed as `<outer>.base` by `lora_layers`)."""
    parent = name.removesuffix(".base")
    return parent != name and isinstance(layers.get(parent), LoraParam) and layers[parent].base is layers[name]


def param_path(owner: str, layer: LoraParam) -> str:
    """A LoraParam's parameter path, as target_parameters and rank_pattern name it."""
    return f"{owner}.{layer.param_name}"


def targets_new(model: nn.Module, file: AdapterFile, exclude: list[str]) -> dict[str, ParamTarget]:
    """A new adapter's parameters, as its target_parameters select them (the first one's config for the module,
    as `apply_lora` does)."""
    if not file.spec.target_parameters:
        return {}
    # a module with LoRA on parameters already (another adapter's) is matched as its owner, as PEFT does
    modules = [(n, m.owner if isinstance(m, LoraParam) else m) for n, m in modules_outside_layers(model)]
    owners: dict[str, list[str]] = {}
    try:
        for module, pname in find_parameters(model, file.spec.target_parameters, modules, exclude):
            LoraParam.check_param(owner_of(model, module), pname, file.spec.config.for_module(f"{module}.{pname}"))
            owners.setdefault(module, []).append(pname)
    except (TypeError, ValueError) as e:
        raise LoraFileError(f"{file.config_path}: {e}") from None
    out = {}
    for owner, names in owners.items():
        order = list(owner_of(model, owner)._parameters)
        params = tuple(sorted(names, key=order.index))
        out[owner] = ParamTarget(owner, params, file.spec.config.for_module(f"{owner}.{params[0]}"))
        _check_chain(model, file, out[owner])
    return out


def _check_chain(model: nn.Module, file: AdapterFile, target: ParamTarget) -> None:
    """A module already holding LoRA on parameters takes another adapter on exactly those (PEFT's rule too)."""
    m = model.get_submodule(target.owner)
    if isinstance(m, LoraParam) and tuple(reversed([x.param_name for x in m.chain()])) != target.params:
        held = tuple(reversed([x.param_name for x in m.chain()]))
        raise LoraFileError(
            f"{file.where}: module {target.owner!r} has LoRA on parameters {held}; this adapter adapts "
            f"{target.params}, and adapters on one module adapt the same parameters"
        )


def targets_into(model: nn.Module, file: AdapterFile, name: str | None) -> dict[str, ParamTarget]:
    """Loading into an adapter the model has: its LoraParams, with the file's config for each module."""
    grouped: dict[str, list[LoraParam]] = {}
    for owner, _, layer in holding(lora_layers(model), name).values():
        grouped.setdefault(owner, []).append(layer)
    out = {}
    for owner, layers in grouped.items():
        order = list(layers[0].owner._parameters)
        params = tuple(sorted((x.param_name for x in layers), key=order.index))
        cfg = file.spec.config.for_module(f"{owner}.{params[0]}")
        for layer in layers:
            held_name = layer.adapter_name if name is None else name
            assert held_name is not None, "holding lists the layers holding the adapter"
            held = layer.adapters.config(held_name)
            if cfg.rank != held.rank:
                raise LoraFileError(
                    f"{file.where}: parameter {param_path(owner, layer)!r} has rank {cfg.rank} in the adapter but "
                    f"{held.rank} in the model"
                )
        out[owner] = ParamTarget(owner, params, cfg)
    return out


def plan(model: nn.Module, file: AdapterFile, targets: dict[str, ParamTarget]) -> ParamPlan:
    """Every parameter's file shapes, in the layout its config (peft_version) and shapes say; refuses a file whose
    expert tensors fit no layout of the model's parameter (another expert count, rank or shape), naming both."""
    version = file.spec.raw.get("peft_version")
    shapes: dict[str, tuple[int, ...]] = {}
    layouts: dict[tuple[str, str], str] = {}
    for target in targets.values():
        module = owner_of(model, target.owner)
        a_keys, b_keys = target.keys("lora_A"), target.keys("lora_B")
        for p in target.params:
            g, rank, (ka, kb) = geometry(module, p), target.config.rank, (a_keys[p], b_keys[p])
            layout = expert_layout.CURRENT
            if ka in file.tensors and kb in file.tensors:
                found = (tuple(file.tensors[ka].shape), tuple(file.tensors[kb].shape))
                try:
                    layout = expert_layout.detect(f"{target.owner}.{p}", g, rank, found, version)
                except LoraFileError as e:
                    raise LoraFileError(f"{file.where}: {e}") from None
            shapes[ka], shapes[kb] = expert_layout.file_shapes(g, rank, layout)
            layouts[ka, kb] = layout
    legacy = sorted({k[0] for k, layout in layouts.items() if layout == LEGACY})
    notes = (
        (
            f"{file.where}: {len(legacy)} expert parameters are in the {LEGACY} layout (peft_version "
            f"{version!r}, e.g. {legacy[0]}); converted on load to the {expert_layout.CURRENT} layout, "
            "the same deltas",
        )
        if legacy
        else ()
    )
    return ParamPlan(shapes, _converted(model, file, targets, layouts), notes)


def _converted(
    model: nn.Module, file: AdapterFile, targets: dict[str, ParamTarget], layouts: dict[tuple[str, str], str]
) -> dict[str, Tensor]:
    """The file's factors as lorakit's layers hold them (per expert), for the keys `plan` laid out."""
    out = {}
    for target in targets.values():
        module = owner_of(model, target.owner)
        a_keys, b_keys = target.keys("lora_A"), target.keys("lora_B")
        for p in target.params:
            ka, kb = a_keys[p], b_keys[p]
            if (ka, kb) not in layouts or ka not in file.tensors or kb not in file.tensors:
                continue
            A, B, g = file.tensors[ka], file.tensors[kb], geometry(module, p)
            out[ka], out[kb] = expert_layout.to_experts(A, B, g, target.config.rank, layouts[ka, kb])
    return out


def attach_new(model: nn.Module, targets: dict[str, ParamTarget], adapter: str, active: str | None) -> None:
    """Add adapter `adapter` on every target (a new LoraParam chain, or the one there: `_check_chain` made sure
    it adapts the same parameters); a new chain keeps `active` active where it holds it."""
    for target in targets.values():
        m = model.get_submodule(target.owner)
        if isinstance(m, LoraParam):
            for layer in m.chain():
                layer.adapters.add(adapter, target.config)
        else:
            outer = with_param_lora(m, list(target.params), target.config, adapter_name=adapter)
            set_module(model, target.owner, outer)
            for layer in outer.chain():
                layer.adapters.activate(active if active in layer.adapters.names() else None)


def set_configs(model: nn.Module, targets: dict[str, ParamTarget], adapter: str | None) -> None:
    """The file's config on every LoraParam of the targets (adapter None: each layer's active one)."""
    for target in targets.values():
        m = model.get_submodule(target.owner)
        assert isinstance(m, LoraParam), "attach wrapped every parameter target"
        for layer in m.chain():
            name = adapter or layer.adapter_name
            if name is not None and name in layer.adapters.names():
                layer.adapters.set_config(name, target.config)


def show(notes: Iterable[str]) -> None:
    """Each note as a `LayoutNote` warning, which the user sees once per load."""
    for note in notes:
        warnings.warn(note, LayoutNote, stacklevel=4)
