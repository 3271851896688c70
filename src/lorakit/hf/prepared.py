"""What preparing data makes, shared by both ways of preparing it (`data` for a file, `ondisk` for a directory).

Encoded      {"input_ids": [int], "labels": [int] (causal-lm, -100 where no loss) or int (seq-cls)}
encode_one   one validated example -> Encoded, or the BadRow saying why it has nothing to learn
Prepared     the train/valid rows (lists, or Arrow datasets read on access), label names, bad rows
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from . import chat
from .examples import Example
from .rows import BadRow, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label that PyTorch's cross-entropy (and transformers) skip
SHOWN_BAD_ROWS = 20
Encoded = dict[str, Any]  # {"input_ids": [int], "labels": [int] (causal-lm, -100 on the prompt) or int (seq-cls)}


class BadRowsError(DataError):
    """Bad rows, refused because `skip_bad_rows` is off; `bad_rows` lists them all, `listing` the first few."""

    param = "skip_bad_rows"

    def __init__(self, bad_rows: Sequence[BadRow]) -> None:
        shown = "\n".join(f"  {b}" for b in bad_rows[:SHOWN_BAD_ROWS])
        more = f"\n  ... and {len(bad_rows) - SHOWN_BAD_ROWS} more" if len(bad_rows) > SHOWN_BAD_ROWS else ""
        self.listing = shown + more
        super().__init__(
            f"{len(bad_rows)} bad row(s); fix them, or pass skip_bad_rows=True to leave them out:\n{self.listing}",
            bad_rows,
        )


class Rows(Protocol):
    """Encoded rows by index: a list, or for a data directory a memory-mapped Arrow `datasets.Dataset` (`ondisk`)."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int, /) -> Encoded: ...


@dataclass
class Prepared:
    """Tokenized train/valid sets ready for batching, plus what was dropped and the label names.

    `train`/`valid` are lists for a data file, Arrow datasets read on access for a directory (`ondisk`);
    `cache` keeps their files alive where they live in a temporary directory.
    """

    train: Rows
    valid: Rows
    id2label: dict[int, str] | None
    bad_rows: list[BadRow] = field(default_factory=list)
    chat_template: str | None = None  # the template chat rows were rendered with (saved beside the adapter)
    cache: Any = field(default=None, repr=False)


def encode_one(
    ex: Example,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    max_length: int,
    label2id: Mapping[str | int, int] | None = None,
) -> Encoded | BadRow:
    """One example's token ids and labels (see `encode`), or the BadRow saying why it has nothing to learn."""
    if task == "seq-cls":
        if label2id is None or ex.label is None:
            raise ValueError(f"{ex.where}: seq-cls needs the example's label and label2id (label_to_id)")
        return {"input_ids": tokenizer(ex.text, truncation=True, max_length=max_length)["input_ids"],
                "labels": label2id[ex.label]}  # fmt: skip
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if ex.messages is not None:
        try:
            ids, labels = chat.encode_chat(tokenizer, ex.messages, sys.maxsize, ex.where)  # cut below
        except DataError:
            raise  # no template, no fast tokenizer: a problem of the setup, not of this row
        except ValueError as e:
            return BadRow(ex.path, ex.line, str(e), ex.unit)
    elif ex.completion is None:
        ids = tokenizer(ex.text)["input_ids"] + eos
        labels = list(ids)
    else:
        prompt = tokenizer(ex.text)["input_ids"] if ex.text else []
        completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + eos
        ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    cut = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if len(ids) < 2 or all(x == IGNORE_INDEX for x in labels[1:]):
        return BadRow(ex.path, ex.line, f"{_why_empty(ex, ids, cut)}; nothing to learn from this row", ex.unit)
    return {"input_ids": ids, "labels": labels}


def _why_empty(ex: Example, ids: Sequence[int], cut: bool) -> str:
    """Why a row kept no token to learn from (`cut`: max_length cut it short)."""
    if len(ids) < 2:
        return "fewer than 2 tokens"
    if not cut:  # whole, yet no label after the first token (which nothing predicts)
        return "no token after the row's first is labelled (the first token is never predicted)"
    if ex.messages is not None:
        return "the conversation before the first trained assistant turn fills max_length"
    return "the prompt fills max_length"
