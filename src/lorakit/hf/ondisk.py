"""A data directory tokenized into memory-mapped Arrow files, so that it may be bigger than memory.

    prepared = data.prepare("shards/", "causal-lm", tok, cache_dir="out/run/data-cache")  # comes here
    prepared.train[0]   # {"input_ids": [...], "labels": [...]} (each task's Encoded), read from disk when asked for

Rows are read one at a time (`sources`: Parquet streamed through `datasets`, JSONL line by line; a CSV file
whole), validated and tokenized as `data` does a file (`examples.example`, `encode_one`), and written
in batches to `train.arrow` and `valid.arrow` (Arrow streams) that `datasets.Dataset.from_file`
memory-maps: the trainer's DataLoader indexes them and gets the same dicts of int lists a list would give.
What stays in memory: the bad rows (with their `file:line` / `file:row N` reasons; they are few) and, for
seq-cls, one example per label.

- The validation split (no `valid_path`): a row is held out when a seeded hash of (file, line) falls under
  `valid_fraction`, so no list of all rows is shuffled, and a row keeps its side when other rows change.
  When a side ends up empty (a small directory), the row nearest the cut moves over (`meta.json` says which).
- seq-cls labels: a first pass validates the rows without tokenizing them and keeps one example per label,
  from which `examples.label_names` names the classes exactly as it does for a file.
- The cache is `cache_dir/<fingerprint>/`: the fingerprint hashes the data files (path, size, mtime), the
  tokenizer (its vocabulary and rules, special tokens, chat template) and every setting that changes what is
  written, so a run with the same inputs (a resumed one) reuses the files and any change rebuilds them.
  Building removes the other fingerprints' directories; `meta.json` is written last, so a half-built cache
  is never used. With no `cache_dir` the files go to a temporary directory that lives as long as the
  `Prepared` (its `cache`): never to the `datasets` cache in the home directory.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..files.atomic import write_json
from ..ui.progress import Progress, quiet
from .encoding import encode_one
from .examples import Example, check_columns, example, label_names, label_to_id
from .prepared import BadRowsError, Encoded, Prepared
from .rows import BadRow, DataError
from .sources import data_files, datasets_lib, sources

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMAT = 1  # bump when what the cache holds changes
BATCH_ROWS = 1000  # rows per Arrow record batch: the most tokenized rows held in memory at once
META, TRAIN, VALID = "meta.json", "train.arrow", "valid.arrow"
KEY = re.compile(r"[0-9a-f]{16}")


def prepare(
    train_path: str | Path,
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    valid_path: str | Path | None,
    valid_fraction: float,
    seed: int,
    max_length: int,
    skip_bad_rows: bool,
    max_line_bytes: int,
    chat: bool,
    cache_dir: str | Path | None,
    progress: Progress | None = None,
) -> Prepared:
    """`data.prepare` for a directory (either path): the rows in Arrow files under `cache_dir` (module docstring)."""
    if valid_path is None and not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid fraction {valid_fraction!r} is invalid: expected a number in (0, 1)")
    progress = progress or quiet()
    datasets = datasets_lib()
    holder = tempfile.TemporaryDirectory(prefix="lorakit-data-") if cache_dir is None else None
    root = Path(holder.name if holder is not None else str(cache_dir))
    settings = {"task": task, "max_length": max_length, "max_line_bytes": max_line_bytes}
    if valid_path is None:
        settings |= {"seed": seed, "valid_fraction": valid_fraction}
    key = fingerprint(train_path, valid_path, tokenizer, settings)
    where = root / key
    if (where / META).is_file():
        with progress.task(f"reusing the tokenized rows in {where}"):
            pass
    else:
        _clear(root)
        where.mkdir(parents=True)
        build = _Build(where, task, tokenizer, max_length, max_line_bytes, progress)
        build.run(train_path, valid_path, valid_fraction if valid_path is None else None, seed)
    meta = json.loads((where / META).read_text(encoding="utf-8"))
    train, valid = (datasets.Dataset.from_file(str(where / name)) for name in (TRAIN, VALID))
    train, valid = _move(datasets, train, valid, meta["move"])
    bad = [BadRow(**b) for b in meta["bad_rows"]]
    if bad and not skip_bad_rows:
        raise BadRowsError(bad)
    if not len(train):
        raise DataError(f"{train_path}: no usable training rows", bad)
    if not len(valid):
        raise DataError(f"{valid_path or train_path}: no usable validation rows", bad)
    id2label = {int(k): v for k, v in meta["id2label"].items()} if meta["id2label"] is not None else None
    used_chat = chat or meta["chat"]
    return Prepared(train, valid, id2label, bad, tokenizer.chat_template if used_chat else None, cache=holder)


def fingerprint(
    train_path: str | Path, valid_path: str | Path | None, tokenizer: PreTrainedTokenizerBase, settings: dict[str, Any]
) -> str:
    """16 hex digits naming what a cache holds: the files (path, size, mtime), the tokenizer, the settings."""

    def files(path: str | Path | None) -> list[tuple[str, int, int]] | None:
        if path is None:
            return None
        return [(str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in data_files(path)]

    what = {"format": FORMAT, "train": files(train_path), "valid": files(valid_path), **settings}
    what["tokenizer"] = _tokenizer_spec(tokenizer)
    text = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _tokenizer_spec(tok: PreTrainedTokenizerBase) -> Any:
    """What decides the tokenizer's ids: its rules and vocabulary, special tokens, chat template (not the
    truncation/padding state a call leaves on a fast tokenizer's backend)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        rules = json.loads(backend.to_str())
        rules.pop("truncation", None)
        rules.pop("padding", None)
    else:
        rules = sorted(tok.get_vocab().items())
    flags = {k: getattr(tok, k, None) for k in ("add_bos_token", "add_eos_token", "eos_token_id", "bos_token_id")}
    return [type(tok).__name__, rules, flags, list(tok.all_special_tokens), tok.chat_template]


def _clear(root: Path) -> None:
    """Remove the caches of other fingerprints under `root` (only directories named like one)."""
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and KEY.fullmatch(child.name):
                shutil.rmtree(child)


def _move(datasets: Any, train: Any, valid: Any, move: list[Any] | None) -> tuple[Any, Any]:
    """Apply `meta["move"]`: ["valid", k] moves train row k to the (empty) validation side, ["train", k] back."""
    if move is None:
        return train, valid
    side, k = move
    rows = train if side == "valid" else valid
    one = rows.select(range(k, k + 1))
    parts = [rows.select(range(a, b)) for a, b in ((0, k), (k + 1, len(rows))) if b > a]  # contiguous: no copy
    rest = datasets.concatenate_datasets(parts)
    return (rest, one) if side == "valid" else (one, rest)


class _Writer:
    """Encoded rows appended to an Arrow stream file, BATCH_ROWS at a time."""

    def __init__(self, path: Path, task: str) -> None:
        import pyarrow as pa

        ids = pa.list_(pa.int32())
        columns = {  # the Encoded rows of each task (prepared.py)
            "dpo": [("prompt_ids", ids), ("chosen_ids", ids), ("rejected_ids", ids)],
            "grpo": [("prompt_ids", ids), ("prompt", pa.string()), ("answer", pa.string())],
            "seq-cls": [("input_ids", ids), ("labels", pa.int64())],
        }
        self.schema = pa.schema(columns.get(task, [("input_ids", ids), ("labels", ids)]))
        self.writer = pa.ipc.new_stream(str(path), self.schema)
        self.pending: list[Encoded] = []
        self.count = 0

    def add(self, row: Encoded) -> int:
        """Append a row; its index in the file."""
        self.pending.append(row)
        self.count += 1
        if len(self.pending) >= BATCH_ROWS:
            self.flush()
        return self.count - 1

    def flush(self) -> None:
        """Write the pending rows as one record batch."""
        import pyarrow as pa

        if self.pending:
            self.writer.write_batch(pa.RecordBatch.from_pylist(self.pending, schema=self.schema))
            self.pending = []

    def close(self) -> None:
        """Flush and close the file."""
        self.flush()
        self.writer.close()


@dataclass
class _Build:
    """One pass (two for seq-cls) over the data, writing the cache directory `where`."""

    where: Path
    task: str
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    max_line_bytes: int
    progress: Progress
    bad: list[BadRow] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    chat: bool = False

    def run(self, train_path: str | Path, valid_path: str | Path | None, fraction: float | None, seed: int) -> None:
        """Write train.arrow, valid.arrow and (last) meta.json."""
        id2label, label2id = self._labels(train_path) if self.task == "seq-cls" else (None, None)
        train, valid = _Writer(self.where / TRAIN, self.task), _Writer(self.where / VALID, self.task)
        nearest: dict[str, tuple[float, int]] = {}  # side -> (hash, index) of its row nearest the cut
        try:
            for rel, line, row in self._encoded(train_path, label2id, check_labels=False):
                if fraction is None:
                    train.add(row)
                    continue
                u = _unit_hash(seed, rel, line)
                side, writer, dist = ("valid", valid, fraction - u) if u < fraction else ("train", train, u - fraction)
                index = writer.add(row)
                if side not in nearest or dist < nearest[side][0]:
                    nearest[side] = (dist, index)
            if valid_path is not None:
                for _, _, row in self._encoded(valid_path, label2id, check_labels=True):
                    valid.add(row)
        finally:
            train.close()
            valid.close()
        move = None
        if fraction is not None and valid.count == 0 and train.count >= 2:
            move = ["valid", nearest["train"][1]]
        elif fraction is not None and train.count == 0 and valid.count >= 2:
            move = ["train", nearest["valid"][1]]
        order = {path: i for i, path in reversed(list(enumerate(self.files)))}
        self.bad.sort(key=lambda b: (order.get(b.path, len(order)), b.line))
        meta = {"format": FORMAT, "train_rows": train.count, "valid_rows": valid.count, "move": move,
                "bad_rows": [asdict(b) for b in self.bad], "id2label": id2label, "chat": self.chat}  # fmt: skip
        write_json(self.where / META, meta)

    def _encoded(
        self, path: str | Path, label2id: dict[str | int, int] | None, *, check_labels: bool
    ) -> Iterator[tuple[str, int, Any]]:
        """(file relative to `path`, line, encoded row) of every usable row at `path`; bad ones go to self.bad.
        `check_labels` flags labels missing from `label2id` (validation rows; training rows made it)."""
        root = Path(path)
        with self.progress.task(f"reading and tokenizing {path}", unit="rows") as step:
            for src in sources(path, max_line_bytes=self.max_line_bytes):
                self.files.append(src.path)
                if src.columns is not None:
                    check_columns(src.path, src.columns, self.task, header=src.unit == "line")
                rel = Path(src.path).relative_to(root).as_posix() if root.is_dir() else root.name
                for line, row in src.records:
                    step.advance()
                    try:
                        ex = example(src.path, line, row, self.task, label2id if check_labels else None, src.unit)
                    except ValueError as e:
                        self.bad.append(BadRow(src.path, line, str(e), src.unit))
                        continue
                    self.chat = self.chat or ex.messages is not None
                    enc = encode_one(ex, self.tokenizer, self.task, self.max_length, label2id)
                    if isinstance(enc, BadRow):
                        self.bad.append(enc)
                    else:
                        yield rel, line, enc
                self.bad += src.bad

    def _labels(self, path: str | Path) -> tuple[dict[int, str], dict[str | int, int]]:
        """id2label and label2id from the training rows: one validating pass that keeps the first row per label."""
        first: dict[str | int, Example] = {}
        bad: list[BadRow] = []
        with self.progress.task(f"finding the labels in {path}", unit="rows") as step:
            for src in sources(path, max_line_bytes=self.max_line_bytes):
                if src.columns is not None:
                    check_columns(src.path, src.columns, self.task, header=src.unit == "line")
                for line, row in src.records:
                    step.advance()
                    try:
                        ex = example(src.path, line, row, self.task, None, src.unit)
                    except ValueError as e:
                        bad.append(BadRow(src.path, line, str(e), src.unit))
                        continue
                    assert isinstance(ex, Example) and ex.label is not None  # seq-cls examples have one
                    first.setdefault(ex.label, ex)
                bad += src.bad
        if not first:
            raise DataError(f"{path}: no usable rows", bad)
        examples = list(first.values())
        id2label = label_names(examples)
        return id2label, label_to_id(id2label, examples)


def _unit_hash(seed: int, file: str, line: int) -> float:
    """A row's place in [0, 1), from the seed and where the row is: the same in every run."""
    digest = hashlib.blake2b(f"{seed}\0{file}\0{line}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64
