"""Rows from JSONL or CSV files with their line numbers: the reading half of `data`.

A line that cannot be parsed (invalid JSON, not an object, bad CSV, too long) becomes a `BadRow` naming
`file:line`; file-level problems (not UTF-8, NUL bytes, empty, unknown format, no CSV header) raise `DataError`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoraError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
MAX_LINE_BYTES = 1 << 20  # 1 MiB: far past any sensible training row, short of a runaway file
Row = dict[str, Any]  # one parsed JSONL object or CSV row
AT_LINE, AT_UNIT = "{path}:{line}", "{path}:{unit} {line}"  # where a row is (`where`): in a text file, in Parquet


class DataError(LoraError, ValueError):
    """A data file that cannot be used as it is; `bad_rows` lists the rows at fault, if any."""

    def __init__(self, message: str, bad_rows: Sequence[BadRow] = ()) -> None:
        super().__init__(message)
        self.bad_rows = list(bad_rows)


@dataclass(frozen=True)
class BadRow:
    """One row that cannot be used, with where it is and why; `unit` "row" for Parquet rows (0-based, as ds[N])."""

    path: str
    line: int
    reason: str
    unit: str = "line"

    def __str__(self) -> str:
        return f"{where(self.path, self.line, self.unit)}: {self.reason}"


def where(path: str, line: int, unit: str = "line") -> str:
    """`file:12` for a line of a text file, `file:row 12` for a row of a Parquet file."""
    return (AT_LINE if unit == "line" else AT_UNIT).format(path=path, line=line, unit=unit)


def read_records(
    path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES
) -> tuple[list[tuple[int, Row]], list[BadRow]]:
    """(line, row) pairs from a .jsonl or .csv/.tsv file, and the rows that could not be parsed."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown data format {path.suffix or '(no suffix)'!r}; expected {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    lines, bad = _read_lines(path, max_line_bytes)
    if not any(text.strip() for _, text in lines):
        raise DataError(f"{path}: the file is empty; expected one row per line")
    if fmt == "jsonl":
        records, more_bad = _parse_jsonl(str(path), lines)
    else:
        records, more_bad = _parse_csv(str(path), lines, "," if fmt == "csv" else "\t")
    return records, sorted(bad + more_bad, key=lambda b: b.line)


def _read_lines(path: Path, max_line_bytes: int) -> tuple[list[tuple[int, str]], list[BadRow]]:
    """Physical lines as (number, text); a line over the limit becomes a bad row, not a memory spike."""
    bad: list[BadRow] = []
    return list(iter_lines(path, max_line_bytes, bad)), bad


def iter_lines(path: Path, max_line_bytes: int, bad: list[BadRow]) -> Iterator[tuple[int, str]]:
    """(number, text) of each physical line, read lazily; lines over the limit are appended to `bad`."""
    with open(path, "rb") as f:
        number = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                break
            number += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line in bounded chunks
                    raw = f.readline(max_line_bytes)
                bad.append(BadRow(str(path), number, f"line is longer than {max_line_bytes:,} bytes (max_line_bytes)"))
                continue
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{number}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    "re-save the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
                ) from None
            if "\x00" in text:
                raise DataError(f"{path}:{number}: contains NUL bytes; is this a text file (UTF-16 or binary?)")
            yield number, text


def _parse_jsonl(path: str, lines: list[tuple[int, str]]) -> tuple[list[tuple[int, Row]], list[BadRow]]:
    """JSON objects by line number, and the lines that are not one."""
    records: list[tuple[int, Row]] = []
    bad: list[BadRow] = []
    for number, text in lines:
        row = parse_json_line(path, number, text)
        if isinstance(row, BadRow):
            bad.append(row)
        elif row is not None:
            records.append((number, row))
    return records, bad


def parse_json_line(path: str, number: int, text: str) -> Row | BadRow | None:
    """The JSON object on a line, a BadRow if it is not one, None for a blank line."""
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return BadRow(path, number, f"not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(row, dict):
        return BadRow(path, number, f"expected a JSON object, got {type(row).__name__}")
    return row


def _parse_csv(path: str, lines: list[tuple[int, str]], delimiter: str) -> tuple[list[tuple[int, Row]], list[BadRow]]:
    """Rows keyed by the header, by the line each starts on, and the rows that do not parse or fit it."""
    numbers = [n for n, _ in lines]
    reader = csv.reader(io.StringIO("".join(t for _, t in lines), newline=""), delimiter=delimiter)
    records: list[tuple[int, Row]] = []
    bad: list[BadRow] = []
    header: list[str] | None = None
    while True:
        start = numbers[min(reader.line_num, len(numbers) - 1)]  # the physical line a (maybe multi-line) row starts on
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            bad.append(BadRow(path, start, f"not valid CSV ({e})"))
            continue
        if not cells or all(not c.strip() for c in cells):
            continue
        if header is None:
            header = [c.strip() for c in cells]
            if len(set(header)) != len(header):
                raise DataError(f"{path}:{start}: the CSV header repeats a column name: {header}")
            continue
        if len(cells) != len(header):
            bad.append(
                BadRow(path, start, f"has {len(cells)} fields; the header has {len(header)} ({', '.join(header)})")
            )
            continue
        records.append((start, dict(zip(header, cells, strict=True))))  # lengths checked above
    if header is None:
        raise DataError(f"{path}: the CSV file has no header row")
    return records, bad
