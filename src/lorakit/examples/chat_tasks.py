"""The synthetic tasks of `lorakit example chat`: short digit strings whose answers are checked exactly.

    base skill   next 381    -> 492   (each digit plus one, mod 10): what the base chat model is pre-trained on
    adapter 1    reverse 381 -> 183
    adapter 2    sort 381    -> 138

The base answers every prompt with its skill, which is never the reverse nor the sorted string (the middle digit
would have to equal itself plus one), so its accuracy on the adapters' tasks is 0 and theirs is what they learned.
The 1,000 three-digit strings are split once: held-out prompts (scored, never trained on), validation, training.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..hf.answer_metrics import score

DIGITS = 3
MAX_NEW_TOKENS = 6  # an answer (three digits) and the end of the turn, with room to spare


def _next(x: str) -> str:
    """Each digit plus one, mod 10."""
    return "".join(str((int(d) + 1) % 10) for d in x)


SOLVERS: dict[str, Callable[[str], str]] = {
    "next": _next,
    "reverse": lambda x: x[::-1],
    "sort": lambda x: "".join(sorted(x)),
}
BASE_TASK = "next"
ADAPTER_TASKS = ("reverse", "sort")


@dataclass(frozen=True)
class Split:
    """The digit strings of each part: scored held-out prompts, validation rows, training rows."""

    held_out: tuple[str, ...]
    valid: tuple[str, ...]
    train: tuple[str, ...]


def split(seed: int, held_out: int = 100, valid: int = 50) -> Split:
    """Every `DIGITS`-digit string, shuffled with `seed`, cut into held-out, validation and training strings."""
    strings = [f"{i:0{DIGITS}d}" for i in range(10**DIGITS)]
    random.Random(seed).shuffle(strings)
    return Split(
        tuple(strings[:held_out]), tuple(strings[held_out : held_out + valid]), tuple(strings[held_out + valid :])
    )


def prompt(task: str, x: str) -> str:
    """The user's message for `task` on the digit string `x`."""
    return f"{task} {x}"


def answer(task: str, x: str) -> str:
    """The one right answer."""
    return SOLVERS[task](x)


def messages(task: str, x: str) -> list[dict[str, str]]:
    """The conversation that asks `task` of `x` (a prompt: the assistant's turn is the model's)."""
    return [{"role": "user", "content": prompt(task, x)}]


def write_rows(path: Path, task: str, strings: Sequence[str]) -> Path:
    """A JSONL file of chat rows (`messages`, the assistant's turn the right answer), one per string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = [
        {"messages": [*messages(task, x), {"role": "assistant", "content": answer(task, x)}]} for x in strings
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def exact_match(completions: Sequence[str], task: str, strings: Sequence[str]) -> float:
    """The fraction of completions equal to the right answer (surrounding whitespace aside): `lorakit eval
    --metric exact_match`'s scoring."""
    right = sum(score("exact_match", c, answer(task, x)) for c, x in zip(completions, strings, strict=True))
    return right / len(strings)


def corpus() -> list[str]:
    """Text the tokenizer's vocabulary is trained on: a prompt of each task."""
    return [prompt(task, f"{i:0{DIGITS}d}") for task in SOLVERS for i in range(0, 10**DIGITS, 37)]


def say(text: str = "") -> None:
    """A line of the example's report: stdout, flushed (plain text, fine in pipes and logs)."""
    print(text, flush=True)
