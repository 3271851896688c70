"""The answer metrics' scoring on hand-made cases (edge cases included), and their refusals."""

from __future__ import annotations

import re

import pytest

from lorakit.hf.answer_metrics import MetricError, parse_metric, parse_metrics, score, split_specs

CASES = [  # (metric, generation, reference, expected)
    ("exact_match", "42", "42", 1.0),
    ("exact_match", "  42\n", "42 ", 1.0),  # surrounding whitespace does not count
    ("exact_match", "4 2", "42", 0.0),  # inner whitespace does
    ("exact_match", "Four", "four", 0.0),  # case does
    ("exact_match", "", "", 1.0),
    ("exact_match", "", "four", 0.0),
    ("exact_match", "četiri", "četiri", 1.0),
    ("contains", "the answer is four.", "four", 1.0),
    ("contains", "the answer is four.", " four\n", 1.0),  # the reference is stripped
    ("contains", "the answer is fo ur.", "four", 0.0),
    ("contains", "four", "the answer is four", 0.0),  # the reference in the generation, not the other way
    ("contains", "", "four", 0.0),
    (r"regex:^\d+$", " 123\n", None, 1.0),  # the generation is stripped before matching
    (r"regex:^\d+$", "123 apples", None, 0.0),
    (r"regex:\d+", "123 apples", None, 1.0),  # re.search: anywhere, unless anchored
    ("regex:yes|no", "I think no", "ignored", 1.0),  # the reference is not used
    ("regex:a{1,3}b", "aab", None, 1.0),  # a comma inside the pattern
    ("regex:^$", "   ", None, 1.0),
    ("json_valid", '{"a": [1, 2]}', None, 1.0),
    ("json_valid", ' \n{"a": 1}\n', None, 1.0),
    ("json_valid", "42", None, 1.0),  # any JSON value
    ("json_valid", '"text"', None, 1.0),
    ("json_valid", "{'a': 1}", None, 0.0),  # Python, not JSON
    ("json_valid", '{"a": 1', None, 0.0),
    ("json_valid", '{"a": 1} trailing', None, 0.0),
    ("json_valid", "NaN", None, 0.0),  # json.loads takes it by default; JSON does not
    ("json_valid", '{"a": Infinity}', None, 0.0),
    ("json_valid", "", None, 0.0),
]


@pytest.mark.parametrize(("metric", "generation", "reference", "expected"), CASES)
def test_each_metric_scores_hand_made_cases(metric, generation, reference, expected):
    assert score(metric, generation, reference) == expected
    assert parse_metric(metric).score(generation, reference) == expected


def test_metrics_keep_the_name_they_were_asked_by_and_know_whether_they_need_a_reference():
    metrics = parse_metrics(["exact_match,contains", r"json_valid, regex:^\d{1,3}$"])
    assert [m.name for m in metrics] == ["exact_match", "contains", "json_valid", r"regex:^\d{1,3}$"]
    assert [m.needs_reference for m in metrics] == [True, True, False, False]


def test_a_regex_takes_the_rest_of_its_value_commas_included():
    assert split_specs(["regex:a,b", " exact_match , contains,"]) == ["regex:a,b", "exact_match", "contains"]
    assert split_specs(["contains,regex:x{1,2},json_valid"]) == ["contains", "regex:x{1,2},json_valid"]


def test_unknown_metric_lists_the_valid_ones():
    for spec in ("exact", "exact_match:yes", "EXACT_MATCH", ""):
        with pytest.raises(MetricError, match="unknown metric .*expected one of exact_match, contains, "):
            parse_metric(spec)
    with pytest.raises(MetricError, match=r"regex needs a pattern: regex:PATTERN"):
        parse_metric("regex")


def test_a_bad_regex_names_the_pattern_and_the_re_error():
    with pytest.raises(MetricError) as e:
        parse_metric("regex:a(b")
    try:
        re.compile("a(b")
    except re.error as oracle:
        assert str(oracle) in str(e.value)
    assert "'a(b' is not a valid regex" in str(e.value)


def test_a_metric_that_needs_a_reference_refuses_none_and_repeats_are_refused():
    with pytest.raises(MetricError, match="'exact_match' needs a reference answer"):
        score("exact_match", "four")
    assert score("json_valid", "{}") == 1.0  # no reference needed
    with pytest.raises(MetricError, match="'contains' asked for more than once"):
        parse_metrics(["contains", "exact_match,contains"])
