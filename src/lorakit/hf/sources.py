"""Where training rows come from: one JSONL/CSV file, or a directory of Parquet, JSONL and CSV files; the
reading stage of `data.prepare` (`read_sources`: the training data, then the validation data).

    sources("train.jsonl")      # one Source: rows by line number (rows.read_records)
    sources("data/")            # every .parquet/.jsonl/.ndjson/.csv/.tsv file under data/, in sorted order

A directory may be bigger than memory: its Parquet and JSONL files are read lazily, a row at a time, and
`data.prepare` tokenizes a directory into memory-mapped Arrow files (`ondisk`) rather than Python lists.
Parquet files are read through the `datasets` library, streamed (nothing converted to an Arrow cache),
offline, its cache in a temporary directory removed afterwards; a row is named `file:row N` (0-based, as
`ds[N]`), and a null cell counts as an absent field, so one table can hold rows of several forms. JSONL
files are read line by line with lorakit's reader (`rows.iter_lines`), so that every bad line is named
`file:line` (the `datasets` JSON loader stops at the first line it cannot parse without saying which); CSV
files are read whole, as single files are. Other files in the directory (README.md, dataset_info.json) are
ignored; a directory with no data file is an error.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .rows import FORMATS, MAX_LINE_BYTES, BadRow, DataError, Row, iter_lines, parse_json_line, read_records

PARQUET = ".parquet"
DIR_SUFFIXES = (PARQUET, ".jsonl", ".ndjson", ".csv", ".tsv")  # not .json: in dataset dirs that is metadata


@dataclass
class Source:
    """One data file: its (line or row number, row) pairs, the rows that did not parse, its columns if fixed.

    `records` may be lazy (Parquet, JSONL in a directory): iterate it once; `bad` is complete after that (a
    lazy reader adds the lines it cannot parse as it meets them). `unit` is "line" (text files) or "row"
    (Parquet); `columns` is the CSV header or the Parquet schema, None for JSONL (each row has its own keys).
    """

    path: str
    records: Iterable[tuple[int, Row]]
    unit: str = "line"
    columns: list[str] | None = None
    bad: list[BadRow] = field(default_factory=list)


def sources(path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> list[Source]:
    """The data files at `path` (a file, or a directory searched recursively); DataError if there are none."""
    path = Path(path)
    if not path.is_dir():
        return [_text_source(path, max_line_bytes)]
    return [_dir_source(p, max_line_bytes) for p in data_files(path)]


def read_sources(
    train_path: str | Path, valid_path: str | Path | None, *, max_line_bytes: int = MAX_LINE_BYTES
) -> tuple[list[Source], list[Source] | None]:
    """The training data's sources and the validation data's (None without `valid_path`), read in that order."""
    train = sources(train_path, max_line_bytes=max_line_bytes)
    return train, (sources(valid_path, max_line_bytes=max_line_bytes) if valid_path is not None else None)


def data_files(path: str | Path) -> list[Path]:
    """The files `sources` reads at `path`: the file itself, or a directory's data files in sorted order."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DIR_SUFFIXES and _visible(p, path))
    if not files:
        raise DataError(f"{path}: no data files in this directory; expected {', '.join(DIR_SUFFIXES)} files")
    return files


def _dir_source(path: Path, max_line_bytes: int) -> Source:
    """A file found in a directory: Parquet and JSONL read lazily (they may be big), CSV whole."""
    kind = PARQUET if path.suffix.lower() == PARQUET else FORMATS.get(path.suffix.lower())
    if kind == PARQUET:
        return _parquet_source(path)
    if kind == "jsonl":
        src = Source(str(path), (), "line", None)
        src.records = _jsonl_rows(path, max_line_bytes, src.bad)
        return src
    return _text_source(path, max_line_bytes)


def _visible(file: Path, root: Path) -> bool:
    """False for files under hidden directories or hidden themselves (.git, .cache)."""
    return not any(part.startswith(".") for part in file.relative_to(root).parts)


def _text_source(path: Path, max_line_bytes: int) -> Source:
    """A JSONL or CSV file read whole by line (rows.read_records)."""
    records, bad = read_records(path, max_line_bytes=max_line_bytes)
    columns = list(records[0][1]) if records and FORMATS.get(path.suffix.lower()) != "jsonl" else None
    return Source(str(path), records, "line", columns, bad)


def _jsonl_rows(path: Path, max_line_bytes: int, bad: list[BadRow]) -> Iterator[tuple[int, Row]]:
    """(line, row) pairs of a JSONL file read line by line; bad lines are appended to `bad` as they come."""
    seen = False
    for number, text in iter_lines(path, max_line_bytes, bad):
        row = parse_json_line(str(path), number, text)
        seen = seen or row is not None
        if isinstance(row, BadRow):
            bad.append(row)
        elif row is not None:
            yield number, row
    if not seen and not bad:
        raise DataError(f"{path}: the file is empty; expected one row per line")


def _parquet_source(path: Path) -> Source:
    """A Parquet file streamed through `datasets`; its columns from the schema."""
    datasets = datasets_lib()
    try:
        import pyarrow.parquet as pq

        columns = list(pq.read_schema(path).names)
    except Exception as e:  # pyarrow's ArrowInvalid, OSError, ...: the file is not Parquet, whatever the reason
        raise DataError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None
    return Source(str(path), _parquet_rows(datasets, path), "row", columns)


def _parquet_rows(datasets: Any, path: Path) -> Iterator[tuple[int, Row]]:
    """(row number, row) pairs of a Parquet file, streamed, the datasets cache in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="lorakit-datasets-") as cache:
        try:
            ds = datasets.load_dataset(
                "parquet", data_files=[str(path)], split="train", streaming=True, cache_dir=cache
            )
            yield from ((i, {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(ds))
        except DataError:
            raise
        except Exception as e:  # datasets/pyarrow errors name neither the file nor the row
            raise DataError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None


def datasets_lib() -> Any:
    """The datasets module, offline (local files only; it never needs the network for them)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise DataError("reading a data directory needs the datasets library: pip install 'lorakit[hf]'") from None
    return datasets


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
