"""Model-wide LoRA: find targets, wrap them in place, freeze the rest, merge, count, summarise."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

from torch import Tensor, nn

from .bases import own_bias
from .config import LoraBias, LoraConfig
from .errors import LoraStateError
from .layers import DEFAULT_ADAPTER, LoraLayer, layer_class, supported_types, with_lora, wrapper_for
from .param_layers import LoraParam, nested_key, param_paths, select_params, with_param_lora
from .param_targets import ParamTargets
from .trained_copy import TrainedCopy, trained_copies
from .ui.tables import table, to_text

ALL_LINEAR = "all-linear"


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every LoRA layer in the model, by dotted module name; a LoraParam nested in another (a second parameter
    of one module) follows it as `<name>.base`."""
    out: dict[str, LoraLayer] = {}
    for name, m in modules_outside_layers(model):
        if isinstance(m, LoraLayer):
            out[name] = m
            while isinstance(m.base, LoraParam):
                m, name = m.base, f"{name}.base"
                out[name] = m
    return out


def modules_outside_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`model.named_modules()`, in its order, without what is inside a LoRA layer (its base, its waiting adapters).

    A LoRA layer is yielded, not entered: LoRA layers do not nest, and each holds a submodule per waiting adapter,
    so walking into them made every load slower by the number of adapters already loaded.

    Examples:
        >>> import lorakit as lk
        >>> m = lk.apply_lora(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(rank=2), ["0"])
        >>> [name for name, _ in modules_outside_layers(m)]
        ['', '0']
    """
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        if id(module) in seen:
            return
        seen.add(id(module))
        yield prefix, module
        if isinstance(module, LoraLayer):
            return
        for name, child in module._modules.items():
            if child is not None:
                yield from visit(child, f"{prefix}.{name}" if prefix else name)

    return visit(model, "")


def _is_linear(module: nn.Module) -> bool:
    from .layers import LoraConv1D, LoraLinear

    if isinstance(module, LoraLayer):
        return isinstance(module, LoraLinear)
    return wrapper_for(module) in (LoraLinear, LoraConv1D)


def module_names(model: nn.Module) -> list[str]:
    """Names of the model's modules as a user sees them: a LoRA layer stands for its base, a TrainedCopy for
    its module (nothing inside either is listed)."""
    names: list[str] = []
    inside: tuple[str, ...] = ()  # trained copies (the walk does not enter LoRA layers)
    for name, module in modules_outside_layers(model):
        if not name or name.startswith(inside):
            continue
        names.append(name)
        if isinstance(module, TrainedCopy):
            inside = (*inside, name + ".")
    return names


def plain_biases(model: nn.Module) -> dict[str, nn.Parameter]:
    """The bias of every module outside LoRA layers and trained copies, by module name (bias="model" trains them)."""
    out: dict[str, nn.Parameter] = {}
    for name in module_names(model):
        module = model.get_submodule(name)
        bias = None if isinstance(module, (LoraLayer, TrainedCopy)) else own_bias(module)
        if bias is not None:
            out[name] = bias
    return out


def trained_biases(model: nn.Module, bias: LoraBias | str) -> dict[str, nn.Parameter]:
    """The biases an adapter with `bias` trains, by module name: none, LoRA layers' ("all"), every one ("model")."""
    bias = LoraBias(bias)
    if bias is LoraBias.NONE:
        return {}
    out = {name: b for name, layer in lora_layers(model).items() if (b := own_bias(layer.base)) is not None}
    return {**out, **plain_biases(model)} if bias is LoraBias.MODEL else out


def output_head(model: nn.Module) -> str | None:
    """The name of the output head: `get_output_embeddings()` where the model has it, else its last linear layer."""
    named = list(model.named_modules())
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
        if head is not None:
            return next(name for name, m in named if m is head)
    linears = [name for name in module_names(model) if _is_linear(model.get_submodule(name))]
    return linears[-1] if linears else None


def rule_matches(rule: str, name: str) -> bool:
    """One target rule: exact name, dot-boundary suffix, or `re:<pattern>` (full match)."""
    if rule.startswith("re:"):
        return re.fullmatch(rule[3:], name) is not None
    return name == rule or name.endswith("." + rule)


def find_targets(model: nn.Module, targets: str | Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """The names of the modules `targets` selects, in model order; raises if a rule matches nothing.

    Examples:
        >>> mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> find_targets(mlp, "all-linear")
        ['0']
    """
    rules = [targets] if isinstance(targets, str) else list(targets)
    if not rules or not all(isinstance(r, str) and r for r in rules):
        raise ValueError(
            f"targets={targets!r} is invalid: expected 'all-linear', a module name, a suffix or 're:<regex>'"
        )
    for rule in rules:
        if rule.startswith("re:"):
            try:
                re.compile(rule[3:])
            except re.error as e:
                raise ValueError(f"target {rule!r} is not a valid regex: {e}") from None
    names = module_names(model)
    chosen: dict[str, None] = {}
    for rule in rules:
        if rule == ALL_LINEAR:
            head = output_head(model)
            hits = [n for n in names if _is_linear(model.get_submodule(n)) and n != head]
        else:
            hits = [n for n in names if rule_matches(rule, n)]
        hits = [n for n in hits if not any(rule_matches(e, n) for e in exclude)]
        if not hits:
            raise ValueError(
                f"target {rule!r} matches no module; layer names LoRA can target: {targetable_names(model)} "
                "(a name matches itself and any module name ending in '.' + name; 're:<regex>' matches whole names)"
            )
        chosen.update(dict.fromkeys(hits))
    order = {n: i for i, n in enumerate(names)}
    return sorted(chosen, key=order.__getitem__)


def targetable_names(model: nn.Module) -> str:
    """The last name part of every layer LoRA can wrap (Linear, Conv1D, Embedding, Conv), deduplicated, in order,
    and one full name to show what the rest looks like.

    Examples:
        >>> blocks = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(4, 4), "act": nn.ReLU()}) for _ in range(2))
        >>> targetable_names(nn.ModuleDict({"blocks": blocks, "lm_head": nn.Linear(4, 9)}))
        "q_proj, lm_head (full names like 'blocks.0.q_proj')"
    """
    leaves = [n for n in module_names(model) if wrapper_for(model.get_submodule(n)) is not None]
    if not leaves:
        return "none (no supported layer types)"
    return ", ".join(dict.fromkeys(n.rpartition(".")[2] for n in leaves)) + f" (full names like {leaves[0]!r})"


def apply_lora(
    model: nn.Module,
    config: LoraConfig,
    targets: str | Sequence[str] | ParamTargets | None = None,
    *,
    target_parameters: Sequence[str] = (),
    modules_to_save: Sequence[str] = (),
    exclude: Sequence[str] = (),
    adapter_name: str = DEFAULT_ADAPTER,
) -> nn.Module:
    """Wrap every module `targets` selects, and every parameter `target_parameters` selects, with LoRA, in
    place; freeze every other parameter.

    `targets`: module rules (a name, a dot-suffix, `re:<regex>`, "all-linear"), or a parameter group
    (`lk.params(...)`, Burn-style). None means "all-linear" when no parameter is targeted, else no module
    (PEFT's target_modules=None with target_parameters). `target_parameters`: PEFT's rules on
    `module.param` paths, plus `re:<regex>` and "all-experts" (`lorakit.param_targets`); each parameter gets a
    `LoraParam`, several of one module nested as PEFT nests them.
    `modules_to_save` names modules (same rules) that train in full and are saved with the adapter
    (PEFT's convention, e.g. a new classification head): each is replaced by a `TrainedCopy`, whose copy
    trains while the original stays as it was (a head tied to the embeddings leaves them alone).
    Everything is checked before anything changes.

    Examples:
        >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> mlp = apply_lora(mlp, LoraConfig(rank=2), targets=["0"])
        >>> trainable_parameters(mlp)
        (24, 73)
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}")
    existing = lora_layers(model)
    if existing:
        raise LoraStateError(
            f"the model already has LoRA on {len(existing)} modules (e.g. {next(iter(existing))!r}); "
            "apply_lora twice is not allowed: merge it, or load adapters into the existing layers"
        )
    save_names = _outermost(find_targets(model, list(modules_to_save))) if modules_to_save else []
    skip = [*exclude, *(f"re:{re.escape(n)}(\\..*)?" for n in save_names)]
    owners = select_params(model, config, targets, target_parameters, skip, modules_outside_layers(model))
    if isinstance(targets, ParamTargets) or (targets is None and owners):
        names: list[str] = []
    else:
        names = find_targets(model, ALL_LINEAR if targets is None else targets, exclude=skip)
    _check_modules(model, config, names, owners)
    # all checks passed: now change the model
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        set_module(model, name, with_lora(model.get_submodule(name), config.for_module(name), adapter_name))
    for name, pnames in owners.items():
        set_module(model, name, with_param_lora(model.get_submodule(name), pnames, config, adapter_name, name))
    for name in save_names:
        if not isinstance(model.get_submodule(name), TrainedCopy):  # one kept from an earlier apply_lora stays
            set_module(model, name, TrainedCopy(model.get_submodule(name)))
    for p in trained_biases(model, config.bias).values():
        p.requires_grad_(True)
    return model


def _check_modules(model: nn.Module, config: LoraConfig, names: list[str], owners: dict[str, list[str]]) -> None:
    """Raise where a targeted module cannot be wrapped (its type, variant, init, shape), or is also the owner of
    targeted parameters: every target checked before anything changes."""
    both = [n for n in names if n in owners]
    if both:
        raise ValueError(f"{both[0]!r} is targeted as a module and by its parameters; target it one way")
    bad = [(n, type(model.get_submodule(n)).__name__) for n in names if wrapper_for(model.get_submodule(n)) is None]
    if bad:
        listed = ", ".join(f"{n!r} ({t})" for n, t in bad[:8])
        raise TypeError(f"targets match modules LoRA does not support: {listed}; supported types: {supported_types()}")
    for n in names:  # each layer's own checks (variant, init, grouped convs)
        module = model.get_submodule(n)
        try:
            layer_class(module, config).check_target(module, config.for_module(n))
        except TypeError as e:
            raise TypeError(f"{n!r}: {e}; exclude it or target only those types") from None


def _outermost(names: list[str]) -> list[str]:
    """`names` without those inside another of them (saving a module saves its children)."""
    return [n for n in names if not any(n.startswith(other + ".") for other in names)]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called `name` by `new`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def merge(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by its merged plain layer (W + scaling·B@A), every TrainedCopy by its trained copy.

    Examples:
        >>> mlp = apply_lora(nn.Sequential(nn.Linear(4, 4)), LoraConfig(rank=2), ["0"])
        >>> type(merge(mlp)[0]).__name__
        'Linear'
    """
    layers = lora_layers(model)
    outer = _outermost(list(layers))  # a nested LoraParam's merge is its outer one's
    merged = {name: layers[name].merge() for name in outer}  # all computed (and checked) first
    for name, plain in merged.items():
        set_module(model, name, plain)
    for name, saved in trained_copies(model).items():
        set_module(model, name, saved.trained)
    return model


def merge_(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer in place, reversibly (see `unmerge_`)."""
    layers = lora_layers(model).values()
    if any(layer.merged for layer in layers):
        raise LoraStateError("some LoRA layers are already merged; call unmerge_(model) first")
    for layer in layers:
        layer.merge_()
    return model


def unmerge_(model: nn.Module) -> nn.Module:
    """Undo `merge_`: every base weight becomes exactly what it was."""
    layers = lora_layers(model).values()
    if not all(layer.merged for layer in layers):
        raise LoraStateError("unmerge_ needs every LoRA layer merged; some are not")
    for layer in layers:
        layer.unmerge_()
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts.

    Examples:
        >>> trainable_parameters(nn.Linear(2, 3))
        (9, 9)
    """
    params = list(_unique(model.parameters()))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _unique(params: Iterable[nn.Parameter]) -> Iterable[nn.Parameter]:
    seen: set[int] = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def summary(model: nn.Module) -> str:
    """A table of the LoRA layers: module, base type, active adapter, factor shapes, rank, alpha, trainable count.

    A layer with no active adapter (after `set_adapter(model, None)`) shows "-" for the adapter's columns.

    Examples:
        >>> mlp = apply_lora(nn.Sequential(nn.Linear(4, 8)), LoraConfig(rank=2), ["0"])
        >>> print(summary(mlp))
        module  type    adapter  lora_A  lora_B  rank  alpha  trainable
        ───────────────────────────────────────────────────────────────
        0       Linear  default  2×4     8×2        2      1         24
        trainable 24 of 64 parameters (37.50%)
    """
    t = table(
        "module",
        "type",
        "adapter",
        "lora_A",
        "lora_B",
        "rank",
        "alpha",
        "trainable",
        right=("rank", "alpha", "trainable"),
    )
    for name, layer in param_paths(lora_layers(model)).items():
        n = sum(p.numel() for k, p in layer.named_parameters() if p.requires_grad and not nested_key(layer, k))
        A, B, config = layer.lora_A, layer.lora_B, layer.config
        if A is None or B is None or config is None:  # no active adapter: the layer computes its base
            t.add_row(name, _type(layer), "-", "-", "-", "-", "-", f"{n:,}")
            continue
        t.add_row(
            name,
            _type(layer),
            layer.adapter_name,
            _shape(A),
            _shape(B),
            str(config.rank),
            f"{config.alpha:g}",
            f"{n:,}",
        )
    trainable, total = trainable_parameters(model)
    return to_text(t, f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")


def _type(layer: LoraLayer) -> str:
    return type(layer.owner if isinstance(layer, LoraParam) else layer.base).__name__


def _shape(t: Tensor) -> str:
    return "×".join(map(str, t.shape))
