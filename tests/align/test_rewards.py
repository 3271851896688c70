"""GRPO's rewards: the built-ins on edge cases, a TRL reward function used unchanged, weights, and errors that name
the spec or the function."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

from lorakit.align.rewards import RewardError, RewardScorer, parse_reward


class Chars:
    """A tokenizer whose token i is chr(i): completions are written as text and decoded back exactly."""

    eos_token_id = 0

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["".join(chr(i) for i in row if not (skip_special_tokens and i == self.eos_token_id)) for row in ids]


def ids(*texts: str) -> list[list[int]]:
    return [[ord(c) for c in t] for t in texts]


def scores(specs, completions, answers, n=1, weights=None):
    batch = {"prompt": [f"p{i}" for i in range(len(answers))], "answer": answers}
    return RewardScorer(Chars(), specs, weights)(batch, ids(*completions), n)


@pytest.mark.parametrize(
    ("spec", "completion", "answer", "expected"),
    [
        ("exact_match", " 42\n", "42", 1.0),
        ("exact_match", "42.", "42", 0.0),
        ("exact_match", "", "", 1.0),
        ("exact_match", "anything", None, math.nan),  # no answer: no reward
        ("contains", "so the answer is 42.", " 42 ", 1.0),
        ("contains", "4 2", "42", 0.0),
        ("contains", "x", None, math.nan),
        ("regex:\\d+", "  123 ", None, 1.0),  # the whole stripped completion
        ("regex:\\d+", "abc 123", None, 0.0),  # a match inside is not enough
        ("regex:", "   ", None, 1.0),  # empty pattern, empty completion
        ("regex:a,b{1,2}", "a,bb", None, 1.0),  # commas belong to the pattern
        ("json_valid", ' {"a": [1, 2]} ', None, 1.0),
        ("json_valid", "NaN", None, 0.0),
        ("json_valid", "{'a': 1}", None, 0.0),
        ("json_valid", "", None, 0.0),
    ],
)
def test_builtins(spec, completion, answer, expected):
    got = scores([spec], [completion], [answer])
    assert got.dtype == torch.float32 and got.shape == (1, 1)
    assert math.isnan(expected) and math.isnan(got.item()) or got.item() == expected


def test_eos_is_decoded_away():
    batch = {"prompt": ["p"], "answer": ["ab"]}
    assert RewardScorer(Chars(), ["exact_match"])(batch, [[97, 98, 0]], 1).tolist() == [[1.0]]


@pytest.fixture
def trl_module(tmp_path, monkeypatch):
    """A module written as TRL's docs write reward functions (keyword arguments, **kwargs for the rest)."""
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            CALLS = []

            def length_reward(completions, **kwargs):
                CALLS.append(kwargs)
                return [float(len(c)) for c in completions]

            def accuracy_reward(completions, answer, **kwargs):
                return [None if a is None else float(c.strip() == a) for c, a in zip(completions, answer)]

            def short(completions, **kwargs):
                return [1.0]

            def words(completions, **kwargs):
                return ["high" for _ in completions]

            def infinite(completions, **kwargs):
                return [float("inf") for _ in completions]

            def crash(completions, **kwargs):
                raise ZeroDivisionError("boom")

            NOT_A_FUNCTION = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_a_trl_reward_function_works_unchanged(trl_module):
    batch = {"prompt": ["p0", "p1"], "answer": ["ab", None]}
    scorer = RewardScorer(Chars(), [f"{trl_module}:length_reward", f"{trl_module}:accuracy_reward"], [0.5, 2.0])
    assert scorer.names == ("length_reward", "accuracy_reward") and scorer.weights == (0.5, 2.0)
    got = scorer(batch, ids("ab", "abc", "x", "ab"), n=2)  # prompt-major: two completions per prompt
    assert got[:, 0].tolist() == [2.0, 3.0, 1.0, 2.0]
    assert got[:2, 1].tolist() == [1.0, 0.0] and got[2:, 1].isnan().all()
    (call,) = sys.modules[trl_module].CALLS
    assert call == {
        "prompts": ["p0", "p0", "p1", "p1"],
        "completion_ids": ids("ab", "abc", "x", "ab"),
        "answer": ["ab", "ab", None, None],
    }


def test_callables_names_and_default_weights():
    def my_reward(completions, **kwargs):
        return [1.0] * len(completions)

    scorer = RewardScorer(Chars(), ["regex:a", "regex:b", my_reward, lambda completions, **kw: [0] * len(completions)])
    assert scorer.names == ("regex", "regex_2", "my_reward", "_lambda_") and scorer.weights == (1.0,) * 4
    assert scores(["exact_match", "contains"], ["a"], ["a"]).tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("exact", "unknown reward 'exact'.*exact_match, contains, regex:PATTERN, json_valid"),
        ("regex", "regex needs a pattern"),
        ("regex:(", r"reward 'regex:\(': the pattern '\(' is not a valid regex"),
        ("no_such_module_xyz:fn", "reward 'no_such_module_xyz:fn': cannot import module 'no_such_module_xyz'"),
        ("my_rewards:missing", "module 'my_rewards' has no attribute 'missing'"),
        ("my_rewards:NOT_A_FUNCTION", "my_rewards.NOT_A_FUNCTION is a int, not callable"),
        ("my_rewards:", "unknown reward 'my_rewards:'"),
    ],
)
def test_spec_errors_name_the_spec(trl_module, spec, message):
    with pytest.raises(RewardError, match=message):
        parse_reward(spec)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("short", r"'short' \(my_rewards:short\) returned 1 values for 2 completions"),
        ("words", "'words' .* returned 'high' for completion 0; expected a finite number or None"),
        ("infinite", "returned inf for completion 0"),
        ("crash", r"'crash' \(my_rewards:crash\) raised ZeroDivisionError: boom"),
    ],
)
def test_a_bad_reward_function_is_named(trl_module, fn, message):
    scorer = RewardScorer(Chars(), [f"{trl_module}:{fn}"])
    with pytest.raises(RewardError, match=message):
        scorer({"prompt": ["p"], "answer": [None]}, ids("a", "b"), 2)


def test_weight_errors():
    with pytest.raises(RewardError, match=r"1 reward weight\(s\) \[1.0\] for 2 reward\(s\)"):
        RewardScorer(Chars(), ["exact_match", "json_valid"], [1.0])
    with pytest.raises(RewardError, match="reward weight nan is invalid"):
        RewardScorer(Chars(), ["exact_match"], [math.nan])
    with pytest.raises(RewardError, match="expected a non-empty list"):
        RewardScorer(Chars(), [])
