"""Training data as one pipeline: read (`sources`, `rows`) -> parse and validate every row (`examples`) ->
encode with the template and loss mask (`encoding`, `chat`) -> cache a directory on disk (`ondisk`); `prepare`
runs the stages in order, and none calls back up. Batches follow (`batches`, `packing`).

    causal-lm rows:  {"text": ...}                                    (loss on every token)
                     {"prompt": ..., "completion": ...}               (loss on the completion only)
                     {"messages": [{"role", "content", "train"?}]}    (chat; loss on assistant turns only)
                     {"instruction", "input"?, "output"}               (Alpaca; the standard Alpaca prompt)
    seq-cls rows:    {"text": ..., "label": "positive" | 3}

Data is one .jsonl/.csv/.tsv file, or a directory of Parquet/JSONL/CSV files (`sources`). Chat rows are
rendered with the tokenizer's chat template, or `chat_template=` (a Jinja file, `templates`) for a tokenizer
without one (`chat`). Every bad row (invalid JSON, missing field, wrong type, empty text, unknown label, a bad
message, ...) is reported as `file:line: reason` (`file:row N` in Parquet); `prepare` refuses to go on while any
exist unless told to skip them. File-level problems (not UTF-8, empty, unknown format, a CSV header without the
task's columns, int labels with gaps, chat rows without a template) are errors at once.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..ui.progress import Progress, quiet
from . import ondisk, templates
from .batches import batches, collate
from .encoding import encode, encode_one, encode_splits
from .examples import Example, check_columns, from_sources, label_names, label_to_id, validate
from .prepared import IGNORE_INDEX, BadRowsError, Encoded, Prepared, Rows
from .rows import MAX_LINE_BYTES, BadRow, DataError, read_records
from .sources import read_sources

__all__ = [  # re-exported: callers read rows, examples, encoded rows and batches through `data`
    "IGNORE_INDEX", "MAX_LINE_BYTES", "BadRow", "BadRowsError", "DataError", "Encoded", "Example", "Prepared", "Rows",
    "batches", "check_columns", "collate", "encode", "encode_one", "label_names", "label_to_id", "read_records",
    "validate",
]  # fmt: skip

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

E = TypeVar("E")  # an example of any task (examples.AnyExample)
ENCODE_CHUNK = 256  # rows per tokenizer call in `encode_file`, so the progress moves on a long file


class NoValidSplitError(DataError):
    """Too few rows to hold out a validation split from; `detail` says how many."""

    param = "valid_path"

    def __init__(self, count: int) -> None:
        self.detail = f"cannot hold out a validation split from {count} row(s)"
        super().__init__(f"{self.detail}; give validation rows of their own (valid_path)")


# -- the pipeline ---------------------------------------------------------------------------------


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

    The pipeline: the template file (`templates`), then for data files read (`sources`, `rows`) -> parse and
    validate (`examples`) -> split (`holdout`) -> encode (`encoding`, `chat`), each stage called once, in order,
    none calling back; `batches` and `packing` make the rows into batches afterwards.
    `train_path`/`valid_path` are files or directories (`sources`). A file is read into memory; a directory
    (either path) goes row by row into Arrow files under `cache_dir` (a temporary directory if None) that
    training reads on access, so it may be bigger than memory (`ondisk`). `chat_template` (a Jinja file) is
    set on the tokenizer, replacing its own, so that the model's tokenizer renders chat rows (and later
    prompts) so.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} is invalid: expected at least 2 tokens")
    if chat_template is not None:
        tokenizer.chat_template = templates.read_template(chat_template)
    if Path(train_path).is_dir() or (valid_path is not None and Path(valid_path).is_dir()):
        return ondisk.prepare(
            train_path, task, tokenizer, valid_path=valid_path, valid_fraction=valid_fraction, seed=seed,
            max_length=max_length, skip_bad_rows=skip_bad_rows, max_line_bytes=max_line_bytes,
            chat=chat_template is not None, cache_dir=cache_dir, progress=progress,
        )  # fmt: skip
    train_src, valid_src = read_sources(train_path, valid_path, max_line_bytes=max_line_bytes)
    parsed = from_sources(train_src, valid_src, task, (train_path, valid_path), progress)
    train, valid = parsed.train, parsed.valid
    if valid is None:
        train, valid = holdout(train, valid_fraction, seed) if len(train) >= 2 else (train, [])
    train_enc, valid_enc, more = encode_splits(train, valid, tokenizer, task, max_length, parsed.label2id, progress)
    bad, files = parsed.bad + more, parsed.files
    bad.sort(key=lambda b: (files.index(b.path) if b.path in files else len(files), b.line))
    if bad and not skip_bad_rows:
        raise BadRowsError(bad)
    if not train_enc:
        raise DataError(f"{train_path}: no usable training rows", bad)
    if not valid_enc:
        raise DataError(f"{valid_path or train_path}: no usable validation rows", bad)
    used_chat = chat_template is not None or any(e.messages is not None for e in (*train, *valid))
    return Prepared(train_enc, valid_enc, parsed.id2label, bad, tokenizer.chat_template if used_chat else None)


def holdout(examples: Sequence[E], fraction: float, seed: int) -> tuple[list[E], list[E]]:
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


def encode_file(
    path: str | Path,
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    id2label: Mapping[int, str] | None = None,
    max_length: int = 256,
    skip_bad_rows: bool = False,
    max_line_bytes: int = MAX_LINE_BYTES,
    progress: Progress | None = None,
) -> tuple[list[Encoded], list[BadRow]]:
    """The pipeline for scoring (`evaluate`): read, validate and tokenize a data file as fine-tuning does, the
    stages called in order; seq-cls labels must be `id2label`'s.

        Raises BadRowsError listing every bad row unless `skip_bad_rows`, DataError when no row is usable.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} is invalid: expected at least 2 tokens")
    progress = progress or quiet()
    records, bad = read_records(path, max_line_bytes=max_line_bytes)
    examples, more = validate(path, records, task)
    bad += more
    label2id = None
    if task == "seq-cls":
        if not id2label:
            raise ValueError("seq-cls needs id2label (the adapter's label names) to score the rows")
        labelled = [e for e in examples if isinstance(e, Example)]  # all of them: seq-cls rows
        label2id = label_to_id(id2label, labelled)
        known = ", ".join(map(repr, list(label2id)[:10]))
        bad += [
            BadRow(e.path, e.line, f"unknown label {e.label!r}; the adapter's labels are {known}")
            for e in labelled
            if e.label not in label2id
        ]
        examples = [e for e in labelled if e.label in label2id]
    encoded: list[Encoded] = []
    with progress.task("tokenizing", total=len(examples), unit="rows") as t:
        for i in range(0, len(examples), ENCODE_CHUNK):
            chunk = examples[i : i + ENCODE_CHUNK]
            enc, more = encode(chunk, tokenizer, task, max_length, label2id)
            encoded += enc
            bad += more
            t.advance(len(chunk))
    bad.sort(key=lambda b: b.line)
    if bad and not skip_bad_rows:
        raise BadRowsError(bad)
    if not encoded:
        raise DataError(f"{path}: no usable rows", bad)
    return encoded, bad
