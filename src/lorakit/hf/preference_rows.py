"""Rows of the stages after SFT -> examples: preference pairs (task "dpo") and prompts (task "grpo"), in TRL's
dataset formats, each row checked; `examples.example` hands these tasks' rows here.

    dpo rows:   {"prompt": "...", "chosen": "...", "rejected": "..."}                    (plain text)
                {"prompt": [messages], "chosen": [assistant messages], "rejected": [...]}  (conversational)
    grpo rows:  {"prompt": "..."} or {"messages": [prompt turns]} (TRL's {"prompt": [messages]} too),
                with an optional reference answer {"answer": "..."} that rewards compare with

Other fields are ignored (TRL's datasets carry scores and ids beside the pairs); a blank answer (an empty CSV
cell) is no answer. Every problem with a row is a
ValueError whose message becomes the row's `BadRow` reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .messages import Turn, parse_messages
from .rows import AT_LINE, AT_UNIT, Row

# the columns each form of row needs (examples.FORMS holds them beside the model tasks' forms)
FORMS: dict[str, tuple[tuple[str, ...], ...]] = {
    "dpo": (("prompt", "chosen", "rejected"),),
    "grpo": (("prompt",), ("messages",)),
}
# what each task's form means, for help texts (`examples.form_lines`)
NOTES: dict[tuple[str, tuple[str, ...]], str] = {
    ("dpo", FORMS["dpo"][0]): "texts, or lists of messages for the chat template; learn to prefer chosen",
    ("grpo", ("prompt",)): 'completions are sampled from it; an optional reference "answer" for the rewards',
    ("grpo", ("messages",)): 'the prompt as chat turns, rendered with the chat template; an optional "answer"',
}
Text = str | tuple[Turn, ...]  # a plain text, or chat turns the template renders


@dataclass(frozen=True)
class PairExample:
    """One preference pair: a prompt and two completions of it, `chosen` preferred over `rejected`; all three
    plain texts, or all three turns (`conversational`)."""

    path: str
    line: int
    prompt: Text
    chosen: Text
    rejected: Text
    unit: str = "line"
    where: str = field(init=False, repr=False, compare=False)  # `file:line` (or `file:row N`), for messages

    def __post_init__(self) -> None:
        object.__setattr__(self, "where", (AT_LINE if self.unit == "line" else AT_UNIT).format(**_at(self)))

    @property
    def messages(self) -> tuple[Turn, ...] | None:
        """The prompt's turns when the pair is conversational (rendered with the chat template), else None."""
        return self.prompt if isinstance(self.prompt, tuple) else None


@dataclass(frozen=True)
class PromptExample:
    """One prompt to sample completions of (a text, or turns the chat template renders) and its reference answer."""

    path: str
    line: int
    prompt: Text
    answer: str | None = None
    unit: str = "line"
    where: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "where", (AT_LINE if self.unit == "line" else AT_UNIT).format(**_at(self)))

    @property
    def messages(self) -> tuple[Turn, ...] | None:
        """The prompt's turns when it is a conversation, else None."""
        return self.prompt if isinstance(self.prompt, tuple) else None


def _at(ex: PairExample | PromptExample) -> dict[str, Any]:
    """The fields `rows.where` formats."""
    return {"path": ex.path, "line": ex.line, "unit": ex.unit}


def pair_example(path: str, line: int, row: Row, unit: str = "line") -> PairExample:
    """A dpo row as a PairExample; ValueError saying what is wrong with it."""
    missing = [k for k in FORMS["dpo"][0] if k not in row]
    if missing:
        hint = "; dpo rows are {prompt, chosen, rejected}" if "messages" in row or "completion" in row else ""
        keys = ", ".join(map(repr, row)) or "no fields"
        raise ValueError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
                         f"the row has {keys}{hint}")  # fmt: skip
    chat = isinstance(row["prompt"], list)
    for key in ("prompt", "chosen", "rejected"):
        value = row[key]
        if not isinstance(value, (str, list)):
            raise ValueError(
                f"field {key!r} is a {type(value).__name__} ({str(value)[:40]!r}); "
                "expected a string or a list of {role, content} messages"
            )
        if isinstance(value, list) != chat:
            kinds = {k: "a list of messages" if isinstance(row[k], list) else "a string" for k in ("prompt", key)}
            raise ValueError(
                f"field 'prompt' is {kinds['prompt']} but {key!r} is {kinds[key]}; "
                "give all three as text or all three as messages"
            )
    if chat:
        prompt: Text = parse_messages(row["prompt"], training=False, name="prompt")
        chosen: Text = _completion_turns(row["chosen"], "chosen")
        rejected: Text = _completion_turns(row["rejected"], "rejected")
    else:
        prompt, chosen, rejected = (
            row["prompt"],
            _nonempty(row["chosen"], "chosen"),
            _nonempty(row["rejected"], "rejected"),
        )
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are the same; nothing to prefer")
    return PairExample(path, line, prompt, chosen, rejected, unit)


def _completion_turns(value: Any, key: str) -> tuple[Turn, ...]:
    """A conversational completion: one or more assistant messages."""
    turns = parse_messages(value, training=False, name=key)
    for i, t in enumerate(turns):
        if t.role != "assistant":
            raise ValueError(f"{key}[{i}] has role {t.role!r}; a completion is the assistant's reply")
        if not t.content.strip():
            raise ValueError(f"{key}[{i}] is an empty assistant message")
    return turns


def _nonempty(value: str, key: str) -> str:
    """A completion text, refused when blank."""
    if not value.strip():
        raise ValueError(f"field {key!r} is empty")
    return value


def prompt_example(path: str, line: int, row: Row, unit: str = "line") -> PromptExample:
    """A grpo row as a PromptExample; ValueError saying what is wrong with it."""
    if "prompt" in row and "messages" in row:
        raise ValueError("has both 'prompt' and 'messages'; use one form per row")
    if "prompt" not in row and "messages" not in row:
        keys = ", ".join(map(repr, row)) or "no fields"
        raise ValueError(f"missing field 'prompt' (or 'messages'); the row has {keys}")
    key = "prompt" if "prompt" in row else "messages"
    value = row[key]
    if isinstance(value, list):
        prompt: Text = parse_messages(value, training=False, name=key)
    elif isinstance(value, str) and key == "prompt":
        if not value.strip():
            raise ValueError("field 'prompt' is empty")
        prompt = value
    else:
        wanted = "a list of {role, content} messages" if key == "messages" else "a string or a list of messages"
        raise ValueError(f"field {key!r} is a {type(value).__name__} ({str(value)[:40]!r}); expected {wanted}")
    answer = row.get("answer")  # absent, or a null Parquet cell: no reference answer
    if answer is not None and not isinstance(answer, str):
        raise ValueError(
            f"field 'answer' is a {type(answer).__name__} ({str(answer)[:40]!r}); expected a string "
            f'(write a number as text: "{answer}")'
        )
    return PromptExample(path, line, prompt, answer if answer and answer.strip() else None, unit)
