"""Training data from JSONL or CSV files: read (`rows`), validate every row, tokenize, batch.

    causal-lm rows:  {"text": ...}  or  {"prompt": ..., "completion": ...}   (loss on completion tokens only)
    seq-cls rows:    {"text": ..., "label": "positive" | 3}

Every bad row (invalid JSON, missing field, wrong type, empty text, unknown label, ...) is reported as
`file:line: reason`; `prepare` refuses to go on while any exist unless told to skip them. File-level
problems (not UTF-8, empty, unknown format, missing CSV columns) are errors at once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .models import TASKS
from .rows import MAX_LINE_BYTES, BadRow, DataError, Row, read_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label that PyTorch's cross-entropy (and transformers) skip
SHOWN_BAD_ROWS = 20
Encoded = dict[str, Any]  # {"input_ids": [int], "labels": [int] (causal-lm, -100 on the prompt) or int (seq-cls)}


class BadRowsError(DataError):
    """Bad rows, refused because `skip_bad_rows` is off; `bad_rows` lists them all, `listing` the first few."""

    def __init__(self, bad_rows: Sequence[BadRow]) -> None:
        shown = "\n".join(f"  {b}" for b in bad_rows[:SHOWN_BAD_ROWS])
        more = f"\n  ... and {len(bad_rows) - SHOWN_BAD_ROWS} more" if len(bad_rows) > SHOWN_BAD_ROWS else ""
        self.listing = shown + more
        super().__init__(
            f"{len(bad_rows)} bad row(s); fix them, or pass skip_bad_rows=True to train without them:\n{self.listing}",
            bad_rows,
        )


class NoValidSplitError(DataError):
    """Too few rows to hold out a validation split from; `detail` says how many."""

    def __init__(self, count: int) -> None:
        self.detail = f"cannot hold out a validation split from {count} row(s)"
        super().__init__(f"{self.detail}; give validation rows of their own (valid_path)")


@dataclass(frozen=True)
class Example:
    """One validated row. `completion` is set for prompt/completion rows (then `text` is the prompt)."""

    path: str
    line: int
    text: str
    completion: str | None = None
    label: str | int | None = None


@dataclass
class Prepared:
    """Tokenized train/valid sets ready for batching, plus what was dropped and the label names."""

    train: list[Encoded]
    valid: list[Encoded]
    id2label: dict[int, str] | None
    bad_rows: list[BadRow] = field(default_factory=list)


# -- validation: rows -> examples -----------------------------------------------------------------


def validate(
    path: str | Path, records: Sequence[tuple[int, Row]], task: str, label2id: Mapping[str | int, int] | None = None
) -> tuple[list[Example], list[BadRow]]:
    """Examples for `task` from raw rows; `label2id` (seq-cls) flags labels not seen in training."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is invalid: expected one of {', '.join(TASKS)}")
    where = str(path)
    examples: list[Example] = []
    bad: list[BadRow] = []
    for line, row in records:
        try:
            examples.append(_example(where, line, row, task, label2id))
        except ValueError as e:
            bad.append(BadRow(where, line, str(e)))
    return examples, bad


def _example(path: str, line: int, row: Row, task: str, label2id: Mapping[str | int, int] | None) -> Example:
    """The row as an Example for `task`; ValueError saying what is wrong with it."""
    if task == "causal-lm":
        has_text, has_pair = "text" in row, "prompt" in row or "completion" in row
        if has_text and has_pair:
            raise ValueError("has both 'text' and 'prompt'/'completion'; use one form per row")
        if has_text:
            return Example(path, line, _string(row, "text", allow_empty=False))
        if has_pair:
            return Example(
                path,
                line,
                _string(row, "prompt", allow_empty=True),
                completion=_string(row, "completion", allow_empty=False),
            )
        raise ValueError(f"missing field 'text' (or 'prompt' and 'completion'); the row has {_keys(row)}")
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
    return Example(path, line, text, label=label)


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
    """id2label from training labels: int labels are their own ids; strings are sorted (numbers numerically)."""
    labels = {e.label for e in examples}
    kinds = {type(x) for x in labels}
    if len(kinds) > 1:
        first = {k: next(e for e in examples if type(e.label) is k) for k in kinds}
        where = "; ".join(f"{e.path}:{e.line} has {e.label!r}" for e in first.values())
        raise DataError(f"labels mix strings and ints ({where}); use one kind")
    if len(labels) < 2:
        raise DataError(f"a classifier needs at least 2 labels; the training data has {sorted(map(str, labels))}")
    if kinds == {int}:
        return {i: str(i) for i in range(max(x for x in labels if isinstance(x, int)) + 1)}
    ordered = sorted(
        (x for x in labels if isinstance(x, str)),
        key=lambda s: (0, int(s), s) if s.strip().lstrip("-").isdigit() else (1, 0, s),
    )
    return dict(enumerate(ordered))


def label_to_id(id2label: Mapping[int, str], examples: Sequence[Example]) -> dict[str | int, int]:
    """label -> id for these examples' kind of label (ints map to themselves)."""
    if examples and isinstance(examples[0].label, int):
        return {i: i for i in id2label}
    return {name: i for i, name in id2label.items()}


# -- tokenization and batches ---------------------------------------------------------------------


def encode(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    max_length: int,
    label2id: Mapping[str | int, int] | None = None,
) -> tuple[list[Encoded], list[BadRow]]:
    """Token ids per example; causal-lm labels are -100 on prompt tokens, so loss falls on completions."""
    out: list[Encoded] = []
    bad: list[BadRow] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for ex in examples:
        if task == "seq-cls":
            if label2id is None or ex.label is None:
                raise ValueError(f"{ex.path}:{ex.line}: seq-cls needs the example's label and label2id (label_to_id)")
            ids = tokenizer(ex.text, truncation=True, max_length=max_length)["input_ids"]
            out.append({"input_ids": ids, "labels": label2id[ex.label]})
            continue
        if ex.completion is None:
            ids = (tokenizer(ex.text)["input_ids"] + eos)[:max_length]
            labels = list(ids)
        else:
            prompt = tokenizer(ex.text)["input_ids"] if ex.text else []
            completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + eos
            ids = (prompt + completion)[:max_length]
            labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
        if len(ids) < 2 or all(x == IGNORE_INDEX for x in labels[1:]):
            why = (
                "the prompt fills max_length" if ex.completion is not None and len(ids) >= 2 else "fewer than 2 tokens"
            )
            bad.append(BadRow(ex.path, ex.line, f"{why}; nothing to learn from this row"))
            continue
        out.append({"input_ids": ids, "labels": labels})
    return out, bad


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids and attention_mask (B, T); labels (B, T) with -100 padding, or (B,)."""
    T = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T)
    for i, b in enumerate(batch):
        ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
        mask[i, : len(b["input_ids"])] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if isinstance(batch[0]["labels"], int):
        out["labels"] = torch.tensor([b["labels"] for b in batch])  # (B,)
    else:
        labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for i, b in enumerate(batch):
            labels[i, : len(b["labels"])] = torch.tensor(b["labels"])
        out["labels"] = labels
    return out


def batches(
    data: Sequence[Encoded], batch_size: int, pad_id: int, *, shuffle: bool = False, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches in order, or shuffled with a seed."""
    order = list(range(len(data)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        yield collate([data[j] for j in order[i : i + batch_size]], pad_id)


def holdout(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, valid): a seeded random `fraction` held out (at least one row each side)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"valid fraction {fraction!r} is invalid: expected a number in (0, 1)")
    if len(examples) < 2:
        raise NoValidSplitError(len(examples))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    k = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    held = set(order[:k])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


# -- the whole pipeline ----------------------------------------------------------------------------


def prepare(
    train_path: str | Path,
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    valid_path: str | Path | None = None,
    valid_fraction: float = 0.1,
    seed: int = 0,
    max_length: int = 256,
    skip_bad_rows: bool = False,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Prepared:
    """Read, validate, split and tokenize; raises DataError listing every bad row unless `skip_bad_rows`."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} is invalid: expected at least 2 tokens")
    records, bad = read_records(train_path, max_line_bytes=max_line_bytes)
    train, more = validate(train_path, records, task)
    bad += more
    id2label = label2id = None
    if task == "seq-cls":
        if not train:
            raise DataError(f"{train_path}: no usable rows", bad)
        id2label = label_names(train)
        label2id = label_to_id(id2label, train)
    if valid_path is not None:
        records, more = read_records(valid_path, max_line_bytes=max_line_bytes)
        valid, more2 = validate(valid_path, records, task, label2id)
        bad += more + more2
    else:
        train, valid = holdout(train, valid_fraction, seed) if len(train) >= 2 else (train, [])
    train_enc, more = encode(train, tokenizer, task, max_length, label2id)
    valid_enc, more2 = encode(valid, tokenizer, task, max_length, label2id)
    bad += more + more2
    files = [str(train_path), str(valid_path)]
    bad.sort(key=lambda b: (files.index(b.path) if b.path in files else 2, b.line))
    if bad and not skip_bad_rows:
        raise BadRowsError(bad)
    if not train_enc:
        raise DataError(f"{train_path}: no usable training rows", bad)
    if not valid_enc:
        raise DataError(f"{valid_path or train_path}: no usable validation rows", bad)
    return Prepared(train_enc, valid_enc, id2label, bad)
