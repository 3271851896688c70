"""GRPO's rewards: built-in checks of a completion, or any Python function called as TRL calls reward functions.

    exact_match      1.0 when the completion equals the row's answer, both stripped (`lorakit eval`'s metric)
    contains         1.0 when the row's answer (stripped) occurs in the completion
    regex:PATTERN    1.0 when PATTERN matches the whole stripped completion (re.fullmatch)
    json_valid       1.0 when the stripped completion parses as strict JSON
    pkg.mod:fn       fn(prompts=, completions=, completion_ids=, answer=) -> one float (or None) per completion

A row without an answer gets None (no reward: nan, left out of the weighted sum) from exact_match and contains. The
user function's convention is TRL's (`GRPOTrainer(reward_funcs=...)`), so a TRL reward function works unchanged;
take `**kwargs` for the arguments you do not use. `RewardScorer` scores a batch's completions with every reward:
the `Scorer` a GRPO objective calls.

    scorer = RewardScorer(tokenizer, ["exact_match", "my_rewards:length_penalty"], weights=[1.0, 0.1])
    scores = scorer(batch, completions, n)   # (B*n, 2) float32
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import LoraError
from ..hf.answer_metrics import score

RewardFn = Callable[..., Sequence[Any]]
BUILTINS = "exact_match, contains, regex:PATTERN, json_valid"


class RewardError(LoraError, ValueError):
    """A reward spec that names nothing usable, or a reward function that raised or returned the wrong thing."""


def exact_match(completions: list[str], answer: list[str | None], **_: Any) -> list[float | None]:
    """1.0 where the completion equals the row's answer, both stripped; None where the row has no answer."""
    return [None if a is None else score("exact_match", c, a) for c, a in zip(completions, answer, strict=True)]


def contains(completions: list[str], answer: list[str | None], **_: Any) -> list[float | None]:
    """1.0 where the row's answer (stripped) occurs in the completion; None where the row has no answer."""
    return [None if a is None else score("contains", c, a) for c, a in zip(completions, answer, strict=True)]


def json_valid(completions: list[str], **_: Any) -> list[float | None]:
    """1.0 where the stripped completion parses as strict JSON (NaN and Infinity are not JSON)."""
    return [score("json_valid", c) for c in completions]


@dataclass(frozen=True)
class FullMatch:
    """The `regex:PATTERN` reward: 1.0 where the pattern matches the whole stripped completion."""

    pattern: re.Pattern[str]

    def __call__(self, completions: list[str], **_: Any) -> list[float | None]:
        """One score per completion."""
        return [1.0 if self.pattern.fullmatch(c.strip()) else 0.0 for c in completions]


@dataclass(frozen=True)
class Reward:
    """One reward as asked for: `spec` (what the user wrote), `name` (an identifier: metrics read
    `rewards/<name>/mean`), and `fn`, called TRL's way."""

    spec: str
    name: str
    fn: RewardFn


def _identifier(name: str) -> str:
    """`name` made an identifier (metric names are): other characters become '_'."""
    out = re.sub(r"\W", "_", name)
    return out if out.isidentifier() else f"reward_{out}"


def _import(spec: str, path: str, attribute: str) -> RewardFn:
    """The callable `attribute` of module `path`; RewardError naming the spec and what is wrong."""
    try:
        module = importlib.import_module(path)
    except ImportError as e:
        raise RewardError(f"reward {spec!r}: cannot import module {path!r} ({e}); expected pkg.module:function") from e
    fn = getattr(module, attribute, None)
    if fn is None:
        raise RewardError(f"reward {spec!r}: module {path!r} has no attribute {attribute!r}")
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {path}.{attribute} is a {type(fn).__name__}, not callable")
    return fn


def parse_reward(spec: str | RewardFn) -> Reward:
    """The reward a spec names (see the module docstring), or a Python callable given directly (named after it).

    Raises RewardError naming the spec: an unknown name (listing the built-ins), a regex that does not compile, a
    module that cannot be imported, a missing or non-callable attribute.

    Examples:
        >>> r = parse_reward("regex:[0-9]+")
        >>> r.name, r.fn(completions=[" 42 ", "4x"])
        ('regex', [1.0, 0.0])
    """
    if callable(spec):
        name = getattr(spec, "__name__", type(spec).__name__)
        return Reward(f"{getattr(spec, '__module__', '?')}:{name}", _identifier(name), spec)
    if not isinstance(spec, str):
        raise RewardError(f"reward {spec!r} is a {type(spec).__name__}; expected a string such as 'exact_match'")
    builtin: dict[str, RewardFn] = {"exact_match": exact_match, "contains": contains, "json_valid": json_valid}
    if spec.strip() in builtin:
        return Reward(spec.strip(), spec.strip(), builtin[spec.strip()])
    kind, colon, rest = spec.partition(":")
    if kind.strip() == "regex" and colon:
        try:
            return Reward(spec, "regex", FullMatch(re.compile(rest)))
        except re.error as e:
            raise RewardError(f"reward {spec!r}: the pattern {rest!r} is not a valid regex ({e})") from None
    path, attribute = kind.strip(), rest.strip()
    if colon and attribute.isidentifier() and all(p.isidentifier() for p in path.split(".")):
        return Reward(spec, _identifier(attribute), _import(spec, path, attribute))
    hint = " (regex needs a pattern: regex:PATTERN)" if kind.strip() == "regex" else ""
    raise RewardError(f"unknown reward {spec!r}{hint}; expected one of {BUILTINS}, or pkg.module:function")


def _unique(names: list[str]) -> tuple[str, ...]:
    """The names, a repeated one numbered from its second use on (regex, regex_2)."""
    out: list[str] = []
    for name in names:
        candidate, k = name, 1
        while candidate in out:
            k += 1
            candidate = f"{name}_{k}"
        out.append(candidate)
    return tuple(out)


def _checked(reward: Reward, values: Any, rows: int) -> list[float]:
    """The function's scores as floats (None: nan); RewardError naming it for a wrong length, type or value."""
    what = f"reward function {reward.name!r} ({reward.spec})"
    if isinstance(values, Tensor):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RewardError(f"{what} returned a {type(values).__name__}; expected a list of {rows} floats or None")
    if len(values) != rows:
        raise RewardError(f"{what} returned {len(values)} values for {rows} completions; expected one per completion")
    out = []
    for k, v in enumerate(values):
        if v is None:
            out.append(math.nan)
        elif isinstance(v, numbers.Real) and not math.isinf(float(v)):
            out.append(float(v))
        else:
            raise RewardError(f"{what} returned {v!r} for completion {k}; expected a finite number or None")
    return out


def _run(reward: Reward, kwargs: dict[str, Any], rows: int) -> list[float]:
    """One reward's scores of the batch; RewardError naming the function if it raises or returns a wrong value."""
    try:
        values = reward.fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's function: say which one failed and how
        raise RewardError(f"reward function {reward.name!r} ({reward.spec}) raised {type(e).__name__}: {e}") from e
    return _checked(reward, values, rows)


class RewardScorer:
    """Scores completions with each reward: the `Scorer` of a GRPO objective.

    Args:
        tokenizer: decodes the completions (special tokens skipped, as TRL decodes them).
        specs: the rewards (`parse_reward`: built-in names, `regex:PATTERN`, `pkg.module:function`, or callables).
        weights: one per reward (None: all 1.0); the objective sums the weighted rewards.

    `names` are the rewards' metric names (TRL's: the function's name; built-ins their own, a repeat numbered).

    Examples:
        >>> class Tok:
        ...     def batch_decode(self, ids, skip_special_tokens=True): return ["".join(map(str, i)) for i in ids]
        >>> scorer = RewardScorer(Tok(), ["exact_match", "regex:1+"], weights=[1.0, 0.5])
        >>> scorer({"prompt": ["p"], "answer": ["12"]}, [[1, 2], [1, 1]], n=2).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """

    def __init__(self, tokenizer: Any, specs: Sequence[str | RewardFn], weights: Sequence[float] | None = None) -> None:
        if isinstance(specs, str) or not specs:
            raise RewardError(f"rewards={specs!r} is invalid: expected a non-empty list of reward specs")
        self.rewards = [parse_reward(s) for s in specs]
        weights = (1.0,) * len(self.rewards) if weights is None else tuple(weights)
        if len(weights) != len(self.rewards):
            raise RewardError(
                f"{len(weights)} reward weight(s) {list(weights)} for {len(self.rewards)} reward(s) "
                f"{[r.spec for r in self.rewards]}: expected one weight per reward"
            )
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
                raise RewardError(f"reward weight {w!r} is invalid: expected a finite number")
        self.tokenizer = tokenizer
        self.weights: tuple[float, ...] = tuple(float(w) for w in weights)
        self.names: tuple[str, ...] = _unique([r.name for r in self.rewards])

    def __call__(self, batch: dict[str, Any], completions: list[list[int]], n: int) -> Tensor:
        """The (B*n, len(names)) float32 scores of completions k = i*n + j of prompt i; nan where a function
        returned None. Each function gets the prompts and answers repeated n times, as TRL repeats them."""
        prompts, answers = list(batch["prompt"]), list(batch.get("answer") or [None] * len(batch["prompt"]))
        rows = len(prompts) * n
        if len(completions) != rows or len(answers) != len(prompts):
            raise ValueError(
                f"{len(completions)} completions and {len(answers)} answers for {len(prompts)} prompts x n={n}: "
                f"expected {rows} completions and one answer per prompt"
            )
        kwargs = {
            "prompts": [p for p in prompts for _ in range(n)],
            "completions": list(self.tokenizer.batch_decode(completions, skip_special_tokens=True)),
            "completion_ids": [list(c) for c in completions],
            "answer": [a for a in answers for _ in range(n)],
        }
        columns = [_run(reward, kwargs, rows) for reward in self.rewards]
        return torch.tensor(columns, dtype=torch.float32).T.reshape(rows, len(self.rewards))
