"""What target rules select, one line per rule, said before anything is wrapped (a rule is a promise: say it held).

    all-experts: 8 parameters (mlp.experts.gate_up_proj, mlp.experts.down_proj in 4 layers); router weights not adapted
    all-linear: 28 modules (self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj in 4 layers, ...)

Names are shortened to what repeats: the part after the last numeric path component (a layer index), with the
number of distinct layers it was found in. A router (the module beside a mixture-of-experts block's experts that
scores them: a 2-D (num_experts, hidden) weight) is adapted only where a rule names it; the line says which.
Each rule is checked on its own, so an error says which rule (and which parameter of `apply_lora`) matched nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .errors import LoraError
from .model import find_targets
from .param_targets import find_parameters, is_experts_module

SHOWN = 4  # distinct shortened names a line lists before "..."


class LoraTargetError(LoraError, ValueError):
    """A target rule matches nothing (or nothing LoRA can adapt); `param` is the `apply_lora` argument it came from
    ("targets" or "target_parameters"), so a front end names its own flag."""


def describe_targets(
    model: nn.Module, targets: Sequence[str] | None, target_parameters: Sequence[str] = ()
) -> list[str]:
    """One line per rule saying what it selects in `model` (before `apply_lora`), as `apply_lora` reads the rules:
    `targets=None` is all-linear when no parameter is targeted, else no modules.

    Raises LoraTargetError (a ValueError) naming the rule and its parameter where a rule matches nothing.

    Examples:
        >>> mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> describe_targets(mlp, ["0"])
        ['0: 1 module (0)']
    """
    modules = list(targets) if targets is not None else ([] if target_parameters else ["all-linear"])
    lines = [_line(rule, _modules(model, rule), "module") for rule in modules]
    selected = {rule: _parameters(model, rule) for rule in target_parameters}
    routers = router_weights(model)
    adapted = [n for n in routers if any(n in names for names in selected.values())]
    for rule, names in selected.items():
        line = _line(rule, names, "parameter")
        if any(_is_expert_weight(model, n) for n in names):
            line += (
                f"; {len(adapted)} of {len(routers)} router weights adapted"
                if adapted
                else ("; router weights not adapted")
            )
        lines.append(line)
    if not target_parameters and any(is_experts_module(m) for m in model.modules()):
        lines.append("expert weights (3-D parameters) not adapted: target_parameters=['all-experts'] adapts them")
    return lines


def router_weights(model: nn.Module) -> list[str]:
    """The full names of the routers' weights: a 2-D (num_experts, ...) parameter of a module beside an experts
    module (Qwen3-MoE's `mlp.gate.weight`, gpt-oss's `mlp.router.weight`)."""
    found: list[str] = []
    for name, parent in model.named_modules():
        experts = [m for m in parent.children() if is_experts_module(m)]
        if not experts:
            continue
        count = int(experts[0].num_experts)
        for child_name, child in parent.named_children():
            for p_name, p in child.named_parameters(recurse=False):
                if child not in experts and p.dim() == 2 and p.shape[0] == count:
                    found.append(".".join(x for x in (name, child_name, p_name) if x))
    return found


def shorten(names: Sequence[str]) -> str:
    """`names` without their layer index: 'q_proj, v_proj in 2 layers' (at most SHOWN names, then '...').

    Examples:
        >>> shorten(["model.layers.0.attn.q_proj", "model.layers.1.attn.q_proj", "lm_head"])
        'attn.q_proj in 2 layers, lm_head'
    """
    groups: dict[str, set[str]] = {}  # the name after its last numeric part -> the prefixes it was found under
    for name in names:
        parts = name.split(".")
        last = max((i for i, part in enumerate(parts[:-1]) if part.isdigit()), default=-1)  # a name stays
        groups.setdefault(".".join(parts[last + 1 :]), set()).add(".".join(parts[: last + 1]))
    layered = [k for k, where in groups.items() if "" not in where]
    flat = [k for k in groups if k not in layered]
    said: list[str] = []
    if layered:
        prefixes = {p for k in layered for p in groups[k]}
        said.append(f"{', '.join(_first(layered))} in {len(prefixes)} layer{'s' * (len(prefixes) != 1)}")
    if flat:
        said.append(", ".join(_first(flat)))
    return ", ".join(said)


def _first(keys: list[str]) -> list[str]:
    return keys[:SHOWN] + (["..."] if len(keys) > SHOWN else [])


def _line(rule: str, names: list[str], what: str) -> str:
    return f"{rule}: {len(names)} {what}{'s' * (len(names) != 1)} ({shorten(names)})"


def _modules(model: nn.Module, rule: str) -> list[str]:
    """The modules one `targets` rule selects; LoraTargetError naming it where it selects none."""
    try:
        return find_targets(model, [rule])
    except ValueError as e:
        raise LoraTargetError(str(e), param="targets") from None


def _parameters(model: nn.Module, rule: str) -> list[str]:
    """The parameters one `target_parameters` rule selects; LoraTargetError naming it where it selects none."""
    try:
        found = find_parameters(model, [rule], model.named_modules())
    except (ValueError, TypeError) as e:  # TypeError: a parameter LoRA cannot adapt (1-D, integer)
        raise LoraTargetError(str(e), param="target_parameters") from None
    return [f"{module}.{param}" for module, param in found]


def _is_expert_weight(model: nn.Module, name: str) -> bool:
    return is_experts_module(model.get_submodule(name.rpartition(".")[0]))
