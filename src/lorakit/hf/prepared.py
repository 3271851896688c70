"""What preparing data makes, shared by both ways of preparing it (`data` for a file, `ondisk` for a directory).

Encoded      {"input_ids": [int], "labels": [int] (causal-lm, -100 where no loss) or int (seq-cls)}
             dpo:  {"prompt_ids": [int], "chosen_ids": [int], "rejected_ids": [int]}  (TRL's tokenisation)
             grpo: {"prompt_ids": [int], "prompt": str (the rendered prompt), "answer": str | None}
Prepared     the train/valid rows (lists, or Arrow datasets read on access), label names, bad rows
BadRowsError the bad rows, refused

Types only: the stages (`encode`, `ondisk`, `packing`, `batches`) make and read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .rows import BadRow, DataError

IGNORE_INDEX = -100  # the label that PyTorch's cross-entropy (and transformers) skip
SHOWN_BAD_ROWS = 20
Encoded = dict[str, Any]  # one encoded row, by task (module docstring)


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
