"""Training data: read (`sources`, `rows`), validate every row (`examples`), tokenize, batch.

    causal-lm rows:  {"text": ...}                                    (loss on every token)
                     {"prompt": ..., "completion": ...}               (loss on the completion only)
                     {"messages": [{"role", "content", "train"?}]}    (chat; loss on assistant turns only)
                     {"instruction", "input"?, "output"}               (Alpaca; the standard Alpaca prompt)
    seq-cls rows:    {"text": ..., "label": "positive" | 3}

Data is one .jsonl/.csv/.tsv file, or a directory of Parquet/JSONL/CSV files (`sources`). Chat rows are
rendered with the tokenizer's chat template, or `chat_template=` (a Jinja file) for a tokenizer without one
(`chat`). Every bad row (invalid JSON, missing field, wrong type, empty text, unknown label, a bad message, ...)
is reported as `file:line: reason` (`file:row N` in Parquet); `prepare` refuses to go on while any exist unless
told to skip them. File-level problems (not UTF-8, empty, unknown format, a CSV header without the task's
columns, int labels with gaps, chat rows without a template) are errors at once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..ui.progress import Progress, quiet
from . import chat, ondisk
from .examples import Example, check_columns, label_names, label_to_id, validate
from .prepared import IGNORE_INDEX, BadRowsError, Encoded, Prepared, Rows, encode_one
from .rows import MAX_LINE_BYTES, BadRow, DataError, read_records
from .sources import sources

__all__ = [  # re-exported: callers read rows, examples and prepared data through `data`
    "IGNORE_INDEX", "MAX_LINE_BYTES", "BadRow", "BadRowsError", "DataError", "Encoded", "Example", "Prepared", "Rows",
    "check_columns", "encode_one", "label_names", "label_to_id", "read_records", "validate",
]  # fmt: skip

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class NoValidSplitError(DataError):
    """Too few rows to hold out a validation split from; `detail` says how many."""

    param = "valid_path"

    def __init__(self, count: int) -> None:
        self.detail = f"cannot hold out a validation split from {count} row(s)"
        super().__init__(f"{self.detail}; give validation rows of their own (valid_path)")


# -- tokenization and batches ---------------------------------------------------------------------


def encode(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    max_length: int,
    label2id: Mapping[str | int, int] | None = None,
    progress: Progress | None = None,
    description: str = "tokenizing",
) -> tuple[list[Encoded], list[BadRow]]:
    """Token ids per example; causal-lm labels are -100 on prompt tokens (and all but assistant turns in chat
    rows), so the loss falls on completions; chat.NoChatTemplateError if a chat row meets no template."""
    out: list[Encoded] = []
    bad: list[BadRow] = []
    with (progress or quiet()).task(description, total=len(examples), unit="rows") as step:
        for ex in examples:
            step.advance()
            enc = encode_one(ex, tokenizer, task, max_length, label2id)
            if isinstance(enc, BadRow):
                bad.append(enc)
            else:
                out.append(enc)
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
    chat_template: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> Prepared:
    """Read, validate, split and tokenize; raises DataError listing every bad row unless `skip_bad_rows`.

    `train_path`/`valid_path` are files or directories (`sources`). A file is read into memory; a directory
    (either path) goes row by row into Arrow files under `cache_dir` (a temporary directory if None) that
    training reads on access, so it may be bigger than memory (`ondisk`). `chat_template` (a Jinja file) is
    set on the tokenizer, replacing its own, so that the model's tokenizer renders chat rows (and later
    prompts) so.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} is invalid: expected at least 2 tokens")
    if chat_template is not None:
        tokenizer.chat_template = chat.read_template(chat_template)
    if Path(train_path).is_dir() or (valid_path is not None and Path(valid_path).is_dir()):
        return ondisk.prepare(
            train_path, task, tokenizer, valid_path=valid_path, valid_fraction=valid_fraction, seed=seed,
            max_length=max_length, skip_bad_rows=skip_bad_rows, max_line_bytes=max_line_bytes,
            chat=chat_template is not None, cache_dir=cache_dir, progress=progress,
        )  # fmt: skip
    train, bad, files = _read(train_path, task, None, max_line_bytes, progress)
    id2label = label2id = None
    if task == "seq-cls":
        if not train:
            raise DataError(f"{train_path}: no usable rows", bad)
        id2label = label_names(train)
        label2id = label_to_id(id2label, train)
    if valid_path is not None:
        valid, more, valid_files = _read(valid_path, task, label2id, max_line_bytes, progress)
        bad, files = bad + more, files + valid_files
    else:
        train, valid = holdout(train, valid_fraction, seed) if len(train) >= 2 else (train, [])
    train_enc, more = encode(train, tokenizer, task, max_length, label2id, progress, "tokenizing training rows")
    valid_enc, more2 = encode(valid, tokenizer, task, max_length, label2id, progress, "tokenizing validation rows")
    bad += more + more2
    bad.sort(key=lambda b: (files.index(b.path) if b.path in files else len(files), b.line))
    if bad and not skip_bad_rows:
        raise BadRowsError(bad)
    if not train_enc:
        raise DataError(f"{train_path}: no usable training rows", bad)
    if not valid_enc:
        raise DataError(f"{valid_path or train_path}: no usable validation rows", bad)
    used_chat = chat_template is not None or any(e.messages is not None for e in (*train, *valid))
    return Prepared(train_enc, valid_enc, id2label, bad, tokenizer.chat_template if used_chat else None)


def _read(
    path: str | Path,
    task: str,
    label2id: Mapping[str | int, int] | None,
    max_line_bytes: int,
    progress: Progress | None,
) -> tuple[list[Example], list[BadRow], list[str]]:
    """Examples and bad rows from every file at `path`, and the files in order (bad rows sort by it)."""
    found = sources(path, max_line_bytes=max_line_bytes)
    examples: list[Example] = []
    bad: list[BadRow] = []
    with (progress or quiet()).task(f"reading {path}", total=len(found), unit="files") as step:
        for src in found:
            if src.columns is not None:
                check_columns(src.path, src.columns, task, header=src.unit == "line")
            more_examples, more_bad = validate(src.path, src.records, task, label2id, unit=src.unit)
            examples += more_examples
            bad += src.bad + more_bad
            step.advance()
    return examples, bad, [src.path for src in found]
