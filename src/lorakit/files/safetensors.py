"""safetensors, read and written by hand: a validated header, then raw little-endian bytes.

Format: u64 header length N | N bytes of JSON {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}} | data.
We parse it ourselves so every malformed file gets a clear error and a header can never be huge.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from torch import Tensor

from ..errors import LoraFileError
from .atomic import atomic_write

MAX_HEADER_BYTES = 16 * 1024 * 1024  # 16 MiB of JSON is far past any adapter's header

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}


def read(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a safetensors file into (tensors, metadata); any flaw raises LoraFileError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file")
    data = path.read_bytes()
    return parse(data, str(path))


def parse(data: bytes, where: str = "<bytes>") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Parse safetensors bytes with every offset, dtype and shape checked."""
    if len(data) < 8:
        raise LoraFileError(f"{where}: not a safetensors file ({len(data)} bytes; the header length alone is 8)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise LoraFileError(f"{where}: header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if 8 + n > len(data):
        raise LoraFileError(f"{where}: header length {n} runs past the end of the file ({len(data)} bytes; truncated?)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LoraFileError(f"{where}: header is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{where}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise LoraFileError(f"{where}: __metadata__ must map strings to strings")
    body = memoryview(data)[8 + n:]
    spans = []
    tensors: dict[str, Tensor] = {}
    for name, info in header.items():
        dtype, shape, begin, end = _entry(where, name, info)
        if not (0 <= begin <= end <= len(body)):
            raise LoraFileError(f"{where}: tensor {name!r} has data_offsets [{begin}, {end}] outside the data ({len(body)} bytes; truncated?)")
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected:
            raise LoraFileError(f"{where}: tensor {name!r} spans {end - begin} bytes; shape {shape} of {NAMES[dtype]} needs {expected}")
        spans.append((begin, end, name))
        raw = body[begin:end]
        t = torch.frombuffer(bytearray(raw), dtype=dtype) if expected else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(shape)
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise LoraFileError(f"{where}: tensors {n0!r} and {n1!r} overlap in the data")
    return tensors, metadata


def _entry(where: str, name: str, info: object) -> tuple[torch.dtype, list[int], int, int]:
    if not isinstance(info, dict):
        raise LoraFileError(f"{where}: entry {name!r} must be an object with dtype, shape, data_offsets")
    name_of_dtype = info.get("dtype")
    dtype = DTYPES.get(name_of_dtype) if isinstance(name_of_dtype, str) else None
    if dtype is None:
        raise LoraFileError(f"{where}: tensor {name!r} has dtype {info.get('dtype')!r}; expected one of {', '.join(DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise LoraFileError(f"{where}: tensor {name!r} has shape {shape!r}; expected a list of non-negative ints")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise LoraFileError(f"{where}: tensor {name!r} has data_offsets {offsets!r}; expected [begin, end]")
    return dtype, shape, offsets[0], offsets[1]


def dumps(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise tensors (any device/layout) to safetensors bytes, in key order."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.dtype not in NAMES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors here does not store")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def write(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically."""
    atomic_write(path, dumps(tensors, metadata))
