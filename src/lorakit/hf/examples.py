"""Rows -> examples: which form a row has (chat turns and Alpaca prompts included), whether it is valid for the
task, and the label names: the parse-and-validate stage of `data.prepare`.

    causal-lm rows:  {"text"} | {"prompt", "completion"} | {"messages": [...]} (chat) | {"instruction", "output"}
    seq-cls rows:    {"text", "label"}
    dpo, grpo rows:  {"prompt", "chosen", "rejected"} | {"prompt" or "messages", "answer"?} (`preference_rows`)

Every problem with a row is a ValueError whose message becomes the row's `BadRow` reason; a CSV header or
Parquet schema without the task's columns is refused once for the file (`check_columns`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..ui.progress import Progress, quiet
from . import preference_rows
from .messages import ROLES as ROLES  # examples.Turn, ...: where callers have always found them
from .messages import Turn as Turn
from .messages import parse_messages as parse_messages
from .models import TRAIN_TASKS
from .preference_rows import PairExample, PromptExample
from .rows import AT_LINE, AT_UNIT, BadRow, DataError, Row
from .sources import Source

# the columns each form of row needs, in the order errors list them
FORMS: dict[str, tuple[tuple[str, ...], ...]] = {
    "causal-lm": (("text",), ("prompt", "completion"), ("messages",), ("instruction", "output")),
    "seq-cls": (("text", "label"),),
    **preference_rows.FORMS,
}
# what each form means, for help texts (`form_lines`)
FORM_NOTES: dict[tuple[str, ...], str] = {
    ("prompt", "completion"): "loss on the completion only",
    ("messages",): "chat: turns of role and content; loss on the assistant's turns",
    ("instruction", "output"): 'Alpaca, with an optional "input"; loss on the output only',
    ("text", "label"): 'label: a name ("positive") or a class id (3)',
}


ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 (the Alpaca field's name)
    """The standard Alpaca prompt for an instruction (and its optional input); the completion follows it.

    Examples:
        >>> alpaca_prompt("Name a colour.").splitlines()[-4:]
        ['### Instruction:', 'Name a colour.', '', '### Response:']
    """
    if input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


# -- rows -> examples ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One validated row: `text` alone, or the prompt before a `completion`, or chat `messages`; a `label`.

    `unit` is "line" for text files, "row" for Parquet rows (see `rows.where`).
    """

    path: str
    line: int
    text: str
    completion: str | None = None
    label: str | int | None = None
    messages: tuple[Turn, ...] | None = None
    unit: str = "line"
    where: str = field(init=False, repr=False, compare=False)  # `file:line` (or `file:row N`), for messages

    def __post_init__(self) -> None:
        # as rows.where writes it, worked out once here: later stages name the row without calling back a stage
        at = AT_LINE if self.unit == "line" else AT_UNIT
        object.__setattr__(self, "where", at.format(path=self.path, line=self.line, unit=self.unit))


AnyExample = Example | PairExample | PromptExample  # what a row of each task parses into


def validate(
    path: str | Path,
    records: Iterable[tuple[int, Row]],
    task: str,
    label2id: Mapping[str | int, int] | None = None,
    *,
    unit: str = "line",
) -> tuple[list[AnyExample], list[BadRow]]:
    """Examples for `task` from raw rows; `label2id` (seq-cls) flags labels not seen in training."""
    if task not in TRAIN_TASKS:
        raise ValueError(f"task={task!r} is invalid: expected one of {', '.join(TRAIN_TASKS)}")
    name = str(path)
    examples: list[AnyExample] = []
    bad: list[BadRow] = []
    for line, row in records:
        try:
            examples.append(example(name, line, row, task, label2id, unit))
        except ValueError as e:
            bad.append(BadRow(name, line, str(e), unit))
    return examples, bad


@dataclass
class Parsed:
    """The examples of the training and validation sources (`valid` None: none given), their bad rows, the files
    in order (bad rows sort by it) and, for seq-cls, the label names and ids from the training examples."""

    train: list[AnyExample]
    valid: list[AnyExample] | None
    bad: list[BadRow]
    files: list[str]
    id2label: dict[int, str] | None = None
    label2id: dict[str | int, int] | None = None


def from_sources(
    train: Sequence[Source],
    valid: Sequence[Source] | None,
    task: str,
    paths: tuple[str | Path, str | Path | None],
    progress: Progress | None = None,
) -> Parsed:
    """Every source's rows validated for `task`; seq-cls labels named from the training rows, and validation
    labels checked against them. DataError for seq-cls training data with no usable row."""
    train_examples, bad = _from_files(train, task, None, paths[0], progress)
    out = Parsed(train_examples, None, bad, [src.path for src in (*train, *(valid or ()))])
    if task == "seq-cls":
        if not train_examples:
            raise DataError(f"{paths[0]}: no usable rows", bad)
        labelled = [e for e in train_examples if isinstance(e, Example)]  # all of them: seq-cls rows
        out.id2label = label_names(labelled)
        out.label2id = label_to_id(out.id2label, labelled)
    if valid is not None:
        out.valid, more = _from_files(valid, task, out.label2id, paths[1], progress)
        out.bad = bad + more
    return out


def _from_files(
    found: Sequence[Source],
    task: str,
    label2id: Mapping[str | int, int] | None,
    path: str | Path | None,
    progress: Progress | None,
) -> tuple[list[AnyExample], list[BadRow]]:
    """Examples and bad rows from the sources of one path (`path` names it on `progress`)."""
    examples: list[AnyExample] = []
    bad: list[BadRow] = []
    with (progress or quiet()).task(f"reading {path}", total=len(found), unit="files") as step:
        for src in found:
            if src.columns is not None:
                check_columns(src.path, src.columns, task, header=src.unit == "line")
            more_examples, more_bad = validate(src.path, src.records, task, label2id, unit=src.unit)
            examples += more_examples
            bad += src.bad + more_bad
            step.advance()
    return examples, bad


def form_lines(task: str) -> list[str]:
    """One line per row form of `task` (FORMS), with what it means: the data part of a help text.

    Examples:
        >>> form_lines("seq-cls")
        ['{"text": ..., "label": ...}  (label: a name ("positive") or a class id (3))']
    """
    lines = []
    for form in FORMS[task]:
        sample = "{" + ", ".join(f'"{k}": {"[...]" if k == "messages" else "..."}' for k in form) + "}"
        note = preference_rows.NOTES.get((task, form), FORM_NOTES.get(form))
        lines.append(f"{sample}  ({note})" if note else sample)
    return lines


def check_columns(path: str, columns: Sequence[str], task: str, *, header: bool = True) -> None:
    """DataError, once for the file, if a CSV header (or Parquet schema) has none of the task's column sets."""
    if any(set(form) <= set(columns) for form in FORMS[task]):
        return
    wanted = ", or ".join(",".join(form) for form in FORMS[task])
    has = ",".join(columns) or "no columns"
    raise DataError(f"{path}: expected columns {wanted}; the {'header' if header else 'file'} has {has}")


def example(
    path: str, line: int, row: Row, task: str, label2id: Mapping[str | int, int] | None = None, unit: str = "line"
) -> AnyExample:
    """One row as an Example for `task` (a PairExample for dpo, a PromptExample for grpo: `preference_rows`);
    `validate` does every row of a file. ValueError saying what is wrong."""
    if task == "causal-lm":
        return _causal(path, line, row, unit)
    if task == "dpo":
        return preference_rows.pair_example(path, line, row, unit)
    if task == "grpo":
        return preference_rows.prompt_example(path, line, row, unit)
    if "text" not in row and "messages" in row:
        raise ValueError("chat rows ('messages') are for task 'causal-lm'; seq-cls rows are {text, label}")
    text = _string(row, "text", allow_empty=False)
    if "label" not in row:
        raise ValueError(f"missing field 'label'; the row has {_keys(row)}")
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ValueError(f"label {label!r} is a {type(label).__name__}; expected a string or an int")
    if isinstance(label, str) and not label.strip():
        raise ValueError("label is empty")
    if isinstance(label, int) and label < 0:
        raise ValueError(f"label {label} is negative; int labels are class ids 0, 1, 2, ...")
    if label2id is not None and label not in label2id:
        known = ", ".join(map(repr, list(label2id)[:10]))
        raise ValueError(f"unknown label {label!r}; the training labels are {known}")
    return Example(path, line, text, label=label, unit=unit)


def _causal(path: str, line: int, row: Row, unit: str) -> Example:
    """A causal-lm row in one of its four forms (FORMS); ValueError if it has none or more than one."""
    forms = [form for form in FORMS["causal-lm"] if any(k in row for k in form)]
    if len(forms) > 1:
        names = [repr(form[0]) if len(form) == 1 else "/".join(map(repr, form)) for form in forms]
        both = f"both {names[0]} and {names[1]}" if len(names) == 2 else ", ".join(names)
        raise ValueError(f"has {both}; use one form per row")
    if not forms:
        raise ValueError(
            "missing field 'text' (or 'prompt' and 'completion', or 'messages', or 'instruction' and 'output'); "
            f"the row has {_keys(row)}"
        )
    form = forms[0]
    if form == ("text",):
        return Example(path, line, _string(row, "text", allow_empty=False), unit=unit)
    if form == ("prompt", "completion"):
        prompt = _string(row, "prompt", allow_empty=True)
        return Example(path, line, prompt, completion=_string(row, "completion", allow_empty=False), unit=unit)
    if form == ("messages",):
        return Example(path, line, "", messages=parse_messages(row["messages"]), unit=unit)
    instruction = _string(row, "instruction", allow_empty=False)
    extra = _string(row, "input", allow_empty=True) if row.get("input") is not None else ""  # Parquet: null
    prompt = alpaca_prompt(instruction, extra)
    return Example(path, line, prompt, completion=_string(row, "output", allow_empty=False), unit=unit)


def _string(row: Row, key: str, *, allow_empty: bool) -> str:
    """The string field `key` of a row; ValueError if missing, not a string, or empty where not allowed."""
    if key not in row:
        raise ValueError(f"missing field {key!r}; the row has {_keys(row)}")
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} is a {type(value).__name__} ({str(value)[:40]!r}); expected a string")
    if not allow_empty and not value.strip():
        raise ValueError(f"field {key!r} is empty")
    return value


def _keys(row: Row) -> str:
    """The row's field names, for error messages."""
    return ", ".join(map(repr, row)) or "no fields"


def label_names(examples: Sequence[Example]) -> dict[int, str]:
    """id2label from training labels: int labels are their own ids; strings are sorted (numbers numerically).

    Int labels must be 0..n-1 with none missing: {0, 1, 2, 7} would silently make 8 classes, 4 never seen.

    Examples:
        >>> label_names([Example("f", 1, "t", label="b"), Example("f", 2, "t", label="a")])
        {0: 'a', 1: 'b'}
    """
    labels = {e.label for e in examples}
    kinds = {type(x) for x in labels}
    if len(kinds) > 1:
        first = {k: next(e for e in examples if type(e.label) is k) for k in kinds}
        shown = "; ".join(f"{e.where} has {e.label!r}" for e in first.values())
        raise DataError(f"labels mix strings and ints ({shown}); use one kind")
    if len(labels) < 2:
        raise DataError(f"a classifier needs at least 2 labels; the training data has {sorted(map(str, labels))}")
    if kinds == {int}:
        ids = sorted(x for x in labels if isinstance(x, int))
        missing = sorted(set(range(ids[-1] + 1)) - set(ids))
        if missing:
            top = next(e for e in examples if e.label == ids[-1])
            raise DataError(
                f"int labels are class ids: {', '.join(map(str, ids))} would make {ids[-1] + 1} classes, and "
                f"{_list(missing)} never occur in the training data ({top.where} has {ids[-1]}); renumber the "
                f'labels 0..{len(ids) - 1}, or write them as strings ("{ids[-1]}") to use them as class names'
            )
        return {i: str(i) for i in ids}
    ordered = sorted(
        (x for x in labels if isinstance(x, str)),
        key=lambda s: (0, int(s), s) if s.strip().lstrip("-").isdigit() else (1, 0, s),
    )
    return dict(enumerate(ordered))


def _list(ids: Sequence[int], most: int = 10) -> str:
    """A short list of ids for a message: `3, 4, 5` or `3, 4, ... (120 in all)`."""
    shown = ", ".join(map(str, ids[:most]))
    return shown if len(ids) <= most else f"{shown}, ... ({len(ids)} in all)"


def label_to_id(id2label: Mapping[int, str], examples: Sequence[Example]) -> dict[str | int, int]:
    """label -> id for these examples' kind of label (ints map to themselves)."""
    if examples and isinstance(examples[0].label, int):
        return {i: i for i in id2label}
    return {name: i for i, name in id2label.items()}
