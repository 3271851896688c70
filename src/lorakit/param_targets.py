"""Which parameters LoRA adapts: PEFT's `target_parameters` rules and Burn-style predicate groups (`params`).

A parameter's path is `f"{module}.{name}"` (`model.layers.0.mlp.experts.gate_up_proj`). A string rule matches a
path as PEFT's `target_parameters` does: the whole path, or a suffix after a dot (`"experts.gate_up_proj"`);
`re:<regex>` matches whole paths; the preset `"all-experts"` selects every 3-D weight of a transformers experts
module (gate_up_proj / up_proj and down_proj: never a router, never a bias). `params(fn, include=, exclude=)`
is Burn's ParamGroup: `fn(path, param)` AND any include rule, minus the exclude rules; groups combine with
`|`, `&` and `-`. LoRA adapts 2-D and 3-D floating-point parameters; a rule naming another is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from torch import Tensor, nn

__all__ = ["ALL_EXPERTS", "ParamTargets", "find_parameters", "is_experts_module", "params", "rule_matches"]

ALL_EXPERTS = "all-experts"
# a transformers v5 experts module (`use_experts_implementation`) carries these; its weights are these names
EXPERTS_ATTRS = ("num_experts", "has_gate", "is_transposed")
EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")

Predicate = Callable[[str, Tensor], bool]


def is_experts_module(module: nn.Module) -> bool:
    """Whether `module` follows transformers' fused-experts contract (3-D gate_up_proj/up_proj and down_proj,
    forward(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)))."""
    return all(hasattr(module, a) for a in EXPERTS_ATTRS) and isinstance(getattr(module, "down_proj", None), Tensor)


def rule_matches(rule: str, path: str) -> bool:
    """One parameter rule: exact path, dot-boundary suffix (PEFT's), or `re:<pattern>` (full match)."""
    if rule.startswith("re:"):
        return re.fullmatch(rule[3:], path) is not None
    return path == rule or path.endswith("." + rule)


def _check_rules(rules: Sequence[str], what: str) -> list[str]:
    out = [rules] if isinstance(rules, str) else list(rules)
    for rule in out:
        if not isinstance(rule, str) or not rule:
            raise ValueError(f"{what} rule {rule!r} is invalid: expected a parameter path, a suffix or 're:<regex>'")
        if rule.startswith("re:"):
            try:
                re.compile(rule[3:])
            except re.error as e:
                raise ValueError(f"{what} rule {rule!r} is not a valid regex: {e}") from None
    return out


def _is_expert_weight(path: str, owner: nn.Module) -> bool:
    return is_experts_module(owner) and path.rpartition(".")[2] in EXPERT_WEIGHTS


def _rule_hits(rule: str, path: str, owner: nn.Module) -> bool:
    return _is_expert_weight(path, owner) if rule == ALL_EXPERTS else rule_matches(rule, path)


def eligible(p: Tensor) -> bool:
    """Whether LoRA can adapt `p`: a floating-point tensor of 2 or 3 dimensions."""
    return p.is_floating_point() and p.dim() in (2, 3)


class ParamTargets:
    """A group of parameters, Burn's ParamGroup: `fn(path, param)` AND (any include rule, where given), minus
    the exclude rules. `a | b`, `a & b` and `a - b` combine groups. Pass it as `apply_lora(..., targets=)`.

    `fn` is asked about the parameters LoRA can adapt only (2-D and 3-D floats); an include rule that names
    another parameter is refused, as is one that matches nothing.

    Examples:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> g = params(lambda path, p: p.shape[0] == 4) | params(include=["1.weight"])
        >>> [f"{module}.{name}" for module, name in g.select(net)]
        ['0.weight', '1.weight']
    """

    def __init__(
        self,
        fn: Predicate | None = None,
        *,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        _op: tuple[str, ParamTargets, ParamTargets] | None = None,
    ) -> None:
        if fn is not None and not callable(fn):
            raise TypeError(f"params(fn) takes a callable fn(path, param) -> bool, got {type(fn).__name__}")
        self.fn, self._op = fn, _op
        self.include = _check_rules(include, "include")
        self.exclude = _check_rules(exclude, "exclude")

    def __or__(self, other: ParamTargets) -> ParamTargets:
        return ParamTargets(_op=("|", self, _group(other)))

    def __and__(self, other: ParamTargets) -> ParamTargets:
        return ParamTargets(_op=("&", self, _group(other)))

    def __sub__(self, other: ParamTargets) -> ParamTargets:
        return ParamTargets(_op=("-", self, _group(other)))

    def __repr__(self) -> str:
        if self._op is not None:
            op, a, b = self._op
            return f"({a!r} {op} {b!r})"
        parts = ([] if self.fn is None else [getattr(self.fn, "__name__", "fn")]) + [
            f"{k}={v!r}" for k, v in (("include", self.include), ("exclude", self.exclude)) if v
        ]
        return f"params({', '.join(parts)})"

    def rules(self) -> list[str]:
        """Every include rule in the group (each must match a parameter)."""
        if self._op is not None:
            return [*self._op[1].rules(), *self._op[2].rules()]
        return list(self.include)

    def matches(self, path: str, p: Tensor, owner: nn.Module) -> bool:
        """Whether the parameter at `path` (held by `owner`) is in the group."""
        if self._op is not None:
            op, a, b = self._op
            if op == "|":
                return a.matches(path, p, owner) or b.matches(path, p, owner)
            if op == "&":
                return a.matches(path, p, owner) and b.matches(path, p, owner)
            return a.matches(path, p, owner) and not b.matches(path, p, owner)
        if self.include and not any(_rule_hits(r, path, owner) for r in self.include):
            return False
        if any(_rule_hits(r, path, owner) for r in self.exclude):
            return False
        return (self.fn is None and bool(self.include)) or (self.fn is not None and eligible(p) and self.fn(path, p))

    def select(self, model: nn.Module, modules: Iterable[tuple[str, nn.Module]] | None = None) -> list[tuple[str, str]]:
        """[(module name, parameter name)] of the group's parameters in `model`, in model order; raises where an
        include rule matches nothing, names a parameter LoRA cannot adapt, or the group selects nothing."""
        candidates = list(_parameters(model.named_modules() if modules is None else modules))
        for rule in self.rules():
            hits = [(path, p) for path, p, owner in candidates if _rule_hits(rule, path, owner)]
            _check_hits(rule, hits, candidates)
        chosen = [(path, p) for path, p, owner in candidates if self.matches(path, p, owner)]
        for path, p in chosen:
            _check_eligible(path, p)
        if not chosen:
            raise ValueError(f"{self!r} selects no parameter; parameters LoRA can target: {targetable(candidates)}")
        return [tuple(path.rsplit(".", 1)) for path, _ in chosen]  # type: ignore[misc]


def _group(other: object) -> ParamTargets:
    if not isinstance(other, ParamTargets):
        raise TypeError(f"parameter groups combine with other groups (lk.params(...)), not {type(other).__name__}")
    return other


def params(fn: Predicate | None = None, *, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> ParamTargets:
    """A parameter group for `apply_lora(model, config, targets=...)`, Burn-style: the 2-D/3-D float parameters
    for which `fn(path, param)` is true (every one if only rules are given) AND that match an `include` rule
    (where given), minus those matching an `exclude` rule. Rules as `target_parameters`: a path, a dot-suffix of
    one, `re:<regex>` or "all-experts".

    Examples:
        >>> g = params(lambda path, p: p.dim() == 3, exclude=["lm_head.weight"])
        >>> g - params(include=["all-experts"])
        (params(<lambda>, exclude=['lm_head.weight']) - params(include=['all-experts']))
    """
    if fn is None and not include:
        raise ValueError("params() needs a predicate fn(path, param) -> bool, include rules, or both")
    return ParamTargets(fn, include=include, exclude=exclude)


def _parameters(modules: Iterable[tuple[str, nn.Module]]) -> Iterable[tuple[str, Tensor, nn.Module]]:
    """(path, parameter, owner) of every module's own parameters, in model order (a top-level module's own
    parameters have no module to wrap, as in PEFT, so they are left out)."""
    for name, module in modules:
        if not name:
            continue
        for pname, p in module.named_parameters(recurse=False):
            yield f"{name}.{pname}", p, module


def _check_hits(rule: str, hits: list[tuple[str, Tensor]], candidates: list[tuple[str, Tensor, nn.Module]]) -> None:
    if not hits:
        raise ValueError(
            f"target parameter {rule!r} matches no parameter; parameters LoRA can target: {targetable(candidates)} "
            "(a rule matches a 'module.param' path or any path ending in '.' + rule; 're:<regex>' matches whole "
            f"paths; {ALL_EXPERTS!r} every transformers experts module's 3-D weights)"
        )


def _check_eligible(path: str, p: Tensor) -> None:
    if not p.is_floating_point():
        raise TypeError(f"parameter {path!r} is {p.dtype}: LoRA adapts floating-point parameters only")
    if p.dim() not in (2, 3):
        raise TypeError(
            f"parameter {path!r} has shape {tuple(p.shape)} ({p.dim()}-D): LoRA adapts 2-D (out, in) and 3-D "
            "(experts, d1, d2) parameters only; exclude it or name the weights"
        )


def targetable(candidates: list[tuple[str, Tensor, nn.Module]]) -> str:
    """The last two parts of every parameter path LoRA can adapt, deduplicated, in order, and one full path."""
    paths = [path for path, p, _ in candidates if eligible(p)]
    if not paths:
        return "none (no 2-D or 3-D floating-point parameters)"
    short = dict.fromkeys(".".join(path.rsplit(".", 2)[-2:]) for path in paths)
    return ", ".join(short) + f" (full paths like {paths[0]!r})"


def find_parameters(
    model: nn.Module,
    rules: Sequence[str] | ParamTargets,
    modules: Iterable[tuple[str, nn.Module]],
    exclude: Sequence[str] = (),
) -> list[tuple[str, str]]:
    """[(module name, parameter name)] that `rules` (target_parameters strings, or a group) select among the
    parameters of `modules` (name, module), in model order, without those under an `exclude` rule (matched
    against the parameter's path and its module's name)."""
    group = rules if isinstance(rules, ParamTargets) else ParamTargets(include=_check_rules(rules, "target_parameters"))
    modules = list(modules)
    found = group.select(model, modules)
    return [(m, p) for m, p in found if not any(rule_matches(e, f"{m}.{p}") or rule_matches(e, m) for e in exclude)]
