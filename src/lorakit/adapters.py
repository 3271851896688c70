"""Many named adapters on one frozen base: list, switch, disable, delete, mixed batches, combine.

Each LoRA layer holds its active adapter as `lora_A`/`lora_B` and the others, frozen, in `stash`
(`lorakit.adapter_set` does every change on one layer; this module does them across the model); switching
rebinds parameters (no copies, no weight changes). Load a named adapter with
`lorakit.load_adapters(model, dir, name="math")`; loading again under the same name is a hot swap.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .adapter_set import check_adapter_name
from .adapter_table import AdapterTable, mixable, refuse_in_mixed_batch
from .composition import RowSpec, composition
from .config import LoraConfig
from .errors import LoraAdapterNotFound, LoraStateError
from .layers import LoraLayer
from .model import lora_layers, set_module
from .param_layers import LoraParam
from .trained_copy import TrainedCopy, trained_copies

_Part = tuple[float, Tensor, Tensor, LoraConfig]  # one adapter in a combination: (weight, A, B, config)


def list_adapters(model: nn.Module) -> list[str]:
    """Every adapter name in the model, sorted.

    Examples:
        >>> import lorakit as lk
        >>> m = lk.apply_lora(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(rank=2), ["0"])
        >>> list_adapters(m)
        ['default']
    """
    return sorted({n for layer in lora_layers(model).values() for n in layer.adapters.names()})


def active_adapter(model: nn.Module) -> str | None:
    """The name of the active adapter (None when no layer has one)."""
    names = Counter(layer.adapter_name for layer in lora_layers(model).values() if layer.adapter_name)
    return names.most_common(1)[0][0] if names else None


def _require(model: nn.Module, name: str) -> dict[str, LoraLayer]:
    layers = lora_layers(model)
    if name not in {n for layer in layers.values() for n in layer.adapters.names()}:
        raise LoraAdapterNotFound(f"no adapter named {name!r}; the model has {list_adapters(model)}")
    return layers


def set_adapter(model: nn.Module, name: str | None) -> nn.Module:
    """Make `name` the active adapter on every layer (trainable); the others wait frozen. None: base only."""
    layers = lora_layers(model) if name is None else _require(model, name)
    refuse_in_mixed_batch(layers.values(), "switch adapters")
    if any(layer.merged for layer in layers.values()):
        raise LoraStateError("cannot switch adapters while merged in place; call unmerge_(model) first")
    for layer in layers.values():
        layer.adapters.activate(name if name in layer.adapters else None)
    return model


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """Temporarily switch to adapter `name`; the previous one is active again on exit."""
    previous = {n: layer.adapter_name for n, layer in lora_layers(model).items()}
    set_adapter(model, name)
    try:
        yield model
    finally:
        for n, layer in lora_layers(model).items():
            layer.adapters.activate(previous.get(n))


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the bare base inside the block: LoRA layers run their base, modules_to_save their original module.

    No weight is touched. A bias trained under bias="all"/"model" is the base's own, so it stays as trained.

    Examples:
        >>> import lorakit as lk
        >>> m = lk.apply_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), lk.LoraConfig(rank=2), ["0"],
        ...                   modules_to_save=["1"])
        >>> with disable_adapters(m):
        ...     type(m[0]).__name__, m[1].disabled
        ('LoraLinear', True)
    """
    layers = lora_layers(model).values()
    refuse_in_mixed_batch(layers, "disable adapters")
    if any(layer.merged for layer in layers):
        raise LoraStateError("the base cannot run bare while adapters are merged in place; call unmerge_(model) first")
    switches: list[LoraLayer | TrainedCopy] = [*layers, *trained_copies(model).values()]
    before = [m.disabled for m in switches]  # nested blocks: the outer one's state comes back on exit
    for m in switches:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(switches, before, strict=True):
            m.disabled = was


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter `name` everywhere; a layer left with no adapter at all becomes its plain base again."""
    layers = _require(model, name)
    refuse_in_mixed_batch(layers.values(), "delete an adapter")
    if any(layer.merged and layer.adapter_name == name for layer in layers.values()):
        raise LoraStateError(f"adapter {name!r} is merged in place; call unmerge_(model) first")
    for module, layer in reversed(layers.items()):  # a nested LoraParam (`<name>.base`) before the one around it
        if name in layer.adapters:
            layer.adapters.delete(name)
        if not layer.adapters.names():
            set_module(model, module, layer.base)
    return model


# -- mixed-adapter batches -------------------------------------------------------------------------


@contextlib.contextmanager
def mixed_batch(model: nn.Module, rows: Sequence[RowSpec]) -> Iterator[nn.Module]:
    """Inside the block, row i of the batch runs with adapter `rows[i]` (None: the bare base), in one forward.

    A row may also be a weighted composition of adapters ({name: weight} or (name, weight) pairs, weights finite,
    negative allowed, 0 dropping the adapter; see `lorakit.composition`): the row then computes
    base(x) + Σ w_k s_k B_k A_k x, what `combine_adapters(weights, method="cat")` would give it, without building it.

    The rows' adapters are copied into the slots of an `AdapterTable` made for this block (zero-padded to the
    largest rank, scaling folded in; closed on exit) and rows pick theirs with batched gathers and bmm. To run
    many mixed batches, keep an `AdapterTable` and use its `batch(rows)`: no copies when a batch starts. An
    inference feature: dropout is not applied. Inside the block the rows' adapters are fixed: switching,
    disabling or deleting adapters is refused, and every input must have exactly `len(rows)` rows.

    Examples:
        >>> import lorakit as lk
        >>> m = lk.apply_lora(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(rank=2), ["0"])
        >>> with mixed_batch(m, ["default", None, {"default": -0.5}]):
        ...     m(torch.zeros(3, 4)).shape
        torch.Size([3, 4])
    """
    layers = lora_layers(model)
    rows = list(rows)
    names = tuple(dict.fromkeys(n for row in rows for n, _ in composition(row)))
    known = {n for layer in layers.values() for n in layer.adapters.names()}  # one walk, however many names
    for n in names:
        if n not in known:
            raise LoraAdapterNotFound(f"no adapter named {n!r}; the model has {list_adapters(model)}")
    refuse_in_mixed_batch(layers.values(), "start another mixed batch")
    if any(layer.merged for layer in layers.values()):
        raise LoraStateError("mixed batches need unmerged adapters; call unmerge_(model) first")
    if any(layer.disabled for layer in layers.values()):
        raise LoraStateError("cannot run a mixed batch inside disable_adapters(); use None rows for the bare base")
    mixable(layers.values(), names)
    with AdapterTable(model, capacity=max(1, len(names))) as table:  # slots 1..n in the rows' order
        for n in names:
            table.load(n)
        with table.batch(rows):
            yield model


# -- combining adapters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CombineReport:
    """What `combine_adapters` built: the new adapter, its method, and per-module relative error of ΔW."""

    name: str
    method: str
    ranks: dict[str, int]
    relative_error: dict[str, float]  # ||ΔW_new - Σ w_i ΔW_i||_F / ||Σ w_i ΔW_i||_F per module

    @property
    def max_relative_error(self) -> float:
        """The largest per-module relative error (0 for an exact combination)."""
        return max(self.relative_error.values(), default=0.0)


COMBINE_METHODS = ("cat", "svd", "linear")  # how combine_adapters folds several adapters into one


def combine_adapters(
    model: nn.Module, weights: Mapping[str, float], name: str, *, method: str = "cat", rank: int | None = None
) -> CombineReport:
    """A new (inactive) adapter `name` from weighted existing ones: ΔW_new ≈ Σ w_i ΔW_i per module.

    - "cat": exact; A stacked, B stacked with w_i·scaling_i folded in; ranks add up.
    - "svd": ΔW computed exactly, then truncated to `rank` by SVD; the report gives the relative error.
    - "linear": A = Σ √(w_i s_i) A_i, B = Σ √(w_i s_i) B_i; needs equal ranks; approximate (cross terms
      B_i A_j remain), as PEFT's "linear" — the report shows how far off it is.

    Examples:
        >>> import lorakit as lk
        >>> m = lk.apply_lora(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(rank=2), ["0"])
        >>> combine_adapters(m, {"default": 0.5}, "halved").max_relative_error < 1e-6
        True
    """
    check_adapter_name(name)
    if method not in COMBINE_METHODS:
        raise ValueError(f"method={method!r} is invalid: expected one of {', '.join(map(repr, COMBINE_METHODS))}")
    if method == "svd" and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"method='svd' needs rank=<int >= 1>, got {rank!r}")
    if not weights:
        raise ValueError("weights is empty: expected {adapter name: weight}")
    for n in weights:
        _require(model, n)
    if name in list_adapters(model):
        raise ValueError(f"adapter {name!r} already exists")
    layers = lora_layers(model)
    refuse_in_mixed_batch(layers.values(), "combine adapters")
    built: dict[str, tuple[LoraLayer, Tensor, Tensor]] = {}
    errors: dict[str, float] = {}
    for module, layer in layers.items():
        parts: list[_Part] = [(w, *layer.adapters.factors(n)) for n, w in weights.items() if n in layer.adapters]
        if not parts:
            continue
        if any(cfg.use_dora for *_, cfg in parts):
            raise ValueError(f"{module!r}: DoRA adapters are not linear in B·A, so they cannot be combined")
        if layer.merged:
            raise LoraStateError(f"{module!r} is merged in place; call unmerge_(model) first")
        A, B = (
            _combine_experts(module, parts, method, rank)
            if _per_expert(layer)
            else _combine(module, parts, method, rank)
        )
        experts = _per_expert(layer)
        want = _sum([w * cfg.scaling * _delta(b, a, experts) for w, a, b, cfg in parts])
        got = _delta(B, A, experts)
        errors[module] = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        built[module] = (layer, A, B)
    ranks = {m: A.shape[1] if _per_expert(layer) else A.shape[0] for m, (layer, A, _) in built.items()}
    for module, (layer, A, B) in built.items():
        r = ranks[module]
        layer.adapters.add(name, LoraConfig(rank=r, alpha=float(r)))  # scaling 1: the weights live in B
        a, b, _ = layer.adapters.factors(name)
        with torch.no_grad():
            a.copy_(A)
            b.copy_(B)
    return CombineReport(name, method, ranks, errors)


def _per_expert(layer: LoraLayer) -> bool:
    """Whether the layer holds a rank-r pair per expert (A (E, r, d_in), B (E, d_out, r)): LoRA on a 3-D parameter."""
    return isinstance(layer, LoraParam) and layer.num_experts is not None


def _combine_experts(module: str, parts: list[_Part], method: str, rank: int | None) -> tuple[Tensor, Tensor]:
    """`_combine` expert by expert, stacked: (A (E, r', d_in), B (E, d_out, r'))."""
    experts = parts[0][1].shape[0]
    each = [_combine(module, [(w, a[e], b[e], cfg) for w, a, b, cfg in parts], method, rank) for e in range(experts)]
    return torch.stack([A for A, _ in each]), torch.stack([B for _, B in each])


def _delta(B: Tensor, A: Tensor, per_expert: bool = False) -> Tensor:
    """B @ A in fp32: (E, d_out, d_in) per expert, else (d_out, d_in·k) (a conv's kernel flattened)."""
    if per_expert:  # not by the number of dimensions: a Conv1d's A (r, d_in, k) and B (d_out, r, 1) are 3-D too
        return B.float() @ A.float()
    return B.reshape(B.shape[0], -1).float() @ A.reshape(A.shape[0], -1).float()


def _sum(terms: list[Tensor]) -> Tensor:
    """terms[0] + terms[1] + ..., left to right (as the builtin sum, without its int start)."""
    return sum(terms[1:], terms[0])


def _combine(module: str, parts: list[_Part], method: str, rank: int | None) -> tuple[Tensor, Tensor]:
    """(A, B) of the combined adapter for one module; B carries the weights and scalings."""
    if method == "cat":
        A = torch.cat([a.detach() for _, a, _, _ in parts])
        B = torch.cat([(_upcast(b.detach()) * (w * cfg.scaling)).to(b.dtype) for w, _, b, cfg in parts], dim=1)
        return A, B
    if method == "linear":
        ranks = {cfg.rank for _, _, _, cfg in parts}
        if len(ranks) > 1:
            raise ValueError(
                f"method='linear' needs equal ranks; {module!r} has ranks {sorted(ranks)} (use 'cat' or 'svd')"
            )
        coef = [abs(w * cfg.scaling) ** 0.5 for w, _, _, cfg in parts]
        sign = [1.0 if w * cfg.scaling >= 0 else -1.0 for w, _, _, cfg in parts]
        A = _sum([c * a.detach() for c, (_, a, _, _) in zip(coef, parts, strict=True)])
        B = _sum([s * c * b.detach() for s, c, (_, _, b, _) in zip(sign, coef, parts, strict=True)])
        return A, B
    assert rank is not None, "combine_adapters checks that method='svd' has a rank"
    _, a0, b0, _ = parts[0]
    delta = _sum([w * cfg.scaling * _delta(b, a) for w, a, b, cfg in parts])  # (d_out, d_in·k)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.shape[0])
    B = (U[:, :k] * S[:k]).to(b0.dtype).reshape(b0.shape[0], k, *b0.shape[2:])
    A = Vh[:k].to(a0.dtype).reshape(k, *a0.shape[1:])
    return A, B


def _upcast(t: Tensor) -> Tensor:
    """`t` in at least float32 (half precision scaled in fp32; a float64 adapter keeps its precision)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
