"""Read an offline W&B run back from its `run-<id>.wandb` file, with wandb's own protobuf Record.

wandb 0.31 ships no Python reader of the file (its old `wandb.sdk.internal.datastore` is gone; `wandb sync` reads it
in Go), so this follows the file's format as that reader did: a 7-byte header (`:W&B`, 0xBEE1, version 0), then
32 KiB blocks of LevelDB-log records (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last), each
whole record a serialised `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7


def records(path: Path) -> list[pb.Record]:
    """Every Record in the file, in order."""
    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), data[:7]
    pos, parts, out = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if left < HEADER or (length == 0 and kind == 0):  # the rest of the block is padding
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            out.append(pb.Record.FromString(parts))
    return out


def read_run(run_dir: Path) -> tuple[dict[str, object], dict[str, list[tuple[int, float]]]]:
    """(config, {metric: [(step, value), ...]}) of the offline run in `run_dir` (internal `_` keys left out)."""
    (path,) = run_dir.glob("run-*.wandb")
    config: dict[str, object] = {}
    history: dict[str, list[tuple[int, float]]] = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            for item in (r.run.config if kind == "run" else r.config).update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    history.setdefault(key, []).append((r.history.step.num, json.loads(item.value_json)))
    return {k: v for k, v in config.items() if not k.startswith("_")}, history
