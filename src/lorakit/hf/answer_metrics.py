"""Scores of generated answers against reference answers: the metric registry behind `lorakit eval --metric` and
`lorakit finetune --eval-metric`. Pure Python (no torch, no transformers), so any code can score a string.

    exact_match      1 when the generation equals the reference, both stripped of surrounding whitespace
    contains         1 when the reference (stripped) occurs in the generation
    regex:PATTERN    1 when `re.search(PATTERN, generation.strip())` finds a match; anchor it (^...$) to ask for
                     the whole answer. The reference is not used
    json_valid       1 when the generation (stripped) parses as strict JSON (any value; NaN and Infinity are not
                     JSON). The reference is not used

    score("exact_match", " 42\\n", "42")     # 1.0
    metrics = parse_metrics(["exact_match,contains", "regex:^\\d+$"])

A metric is named as it was asked for (`regex:^\\d+$` included): that name keys the reports.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..errors import LoraError

REGEX = "regex"
ScoreFn = Callable[[str, "str | None", "re.Pattern[str] | None"], bool]


class MetricError(LoraError, ValueError):
    """An unknown answer metric, a regex that does not compile, or a reference missing where a metric needs one."""


def _exact_match(generation: str, reference: str | None, _: re.Pattern[str] | None) -> bool:
    """The generation equals the reference, both stripped."""
    assert reference is not None  # AnswerMetric.score checks it first
    return generation.strip() == reference.strip()


def _contains(generation: str, reference: str | None, _: re.Pattern[str] | None) -> bool:
    """The stripped reference occurs in the generation."""
    assert reference is not None
    return reference.strip() in generation


def _regex(generation: str, _: str | None, pattern: re.Pattern[str] | None) -> bool:
    """The pattern matches somewhere in the stripped generation (re.search)."""
    assert pattern is not None  # parse_metric compiles it
    return pattern.search(generation.strip()) is not None


def _refuse_constant(name: str) -> object:
    """json.loads's hook for NaN/Infinity: not JSON, so not valid."""
    raise ValueError(f"{name} is not JSON")


def _json_valid(generation: str, _: str | None, __: re.Pattern[str] | None) -> bool:
    """The stripped generation parses as strict JSON."""
    try:
        json.loads(generation.strip(), parse_constant=_refuse_constant)
    except ValueError:  # json.JSONDecodeError included
        return False
    return True


# kind -> (scoring function, needs a reference answer); a new metric is one function and one line here
REGISTRY: dict[str, tuple[ScoreFn, bool]] = {
    "exact_match": (_exact_match, True),
    "contains": (_contains, True),
    REGEX: (_regex, False),
    "json_valid": (_json_valid, False),
}
VALID = "exact_match, contains, regex:PATTERN, json_valid"


@dataclass(frozen=True)
class AnswerMetric:
    """One metric as asked for: its `name` (the spec, e.g. `regex:^\\d+$`), its registry `kind`, its pattern.

    Examples:
        >>> m = parse_metric("contains")
        >>> m.needs_reference, m.score("the answer is 42.", "42")
        (True, 1.0)
    """

    name: str
    kind: str
    pattern: re.Pattern[str] | None = field(default=None, compare=False)

    @property
    def needs_reference(self) -> bool:
        """True when the metric compares the generation with the row's reference answer."""
        return REGISTRY[self.kind][1]

    def score(self, generation: str, reference: str | None = None) -> float:
        """1.0 or 0.0 for one generation; MetricError when the metric needs a reference and there is none."""
        if self.needs_reference and reference is None:
            raise MetricError(f"metric {self.name!r} needs a reference answer; none was given")
        return 1.0 if REGISTRY[self.kind][0](generation, reference, self.pattern) else 0.0


def parse_metric(spec: str) -> AnswerMetric:
    """The metric a spec names: `exact_match`, `contains`, `regex:PATTERN` or `json_valid`.

    Raises MetricError listing the valid metrics for an unknown name, and naming the pattern and `re`'s own
    message for a regex that does not compile.

    Examples:
        >>> parse_metric("regex:^[0-9]+$").score("123")
        1.0
    """
    if not isinstance(spec, str):
        raise MetricError(f"metric {spec!r} is a {type(spec).__name__}; expected a string such as 'exact_match'")
    kind, colon, argument = spec.partition(":")
    kind = kind.strip()
    if kind == REGEX and colon:
        try:
            return AnswerMetric(spec, REGEX, re.compile(argument))
        except re.error as e:
            raise MetricError(f"metric {spec!r}: the pattern {argument!r} is not a valid regex ({e})") from None
    if kind in REGISTRY and kind != REGEX and not colon:
        return AnswerMetric(kind, kind)
    hint = " (regex needs a pattern: regex:PATTERN)" if kind == REGEX else ""
    raise MetricError(f"unknown metric {spec!r}{hint}; expected one of {VALID}")


def split_specs(specs: Iterable[str]) -> list[str]:
    """Each flag value split at commas, except that `regex:` takes the rest of its value, commas and all.

    Examples:
        >>> split_specs(["exact_match,contains", "json_valid,regex:a{1,3}"])
        ['exact_match', 'contains', 'json_valid', 'regex:a{1,3}']
    """
    out: list[str] = []
    for value in specs:
        rest = value
        while rest:
            if rest.lstrip().startswith(f"{REGEX}:"):
                out.append(rest.lstrip())
                break
            head, _, rest = rest.partition(",")
            if head.strip():
                out.append(head.strip())
    return out


def parse_metrics(specs: Iterable[str]) -> list[AnswerMetric]:
    """The metrics of several flag values (`split_specs`), in order; MetricError for a bad one or a repeat."""
    metrics = [parse_metric(s) for s in split_specs(specs)]
    names = [m.name for m in metrics]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise MetricError(f"metric(s) {', '.join(map(repr, repeated))} asked for more than once")
    return metrics


def score(metric: str | AnswerMetric, generation: str, reference: str | None = None) -> float:
    """One generation's score under `metric` (a spec or an AnswerMetric): 1.0 or 0.0.

    Examples:
        >>> score("exact_match", " 42\\n", "42"), score("json_valid", '{"a": 1}'), score("json_valid", "NaN")
        (1.0, 1.0, 0.0)
    """
    m = metric if isinstance(metric, AnswerMetric) else parse_metric(metric)
    return m.score(generation, reference)
