"""safetensors files through the library: what is written reads back exactly, every malformed file is a
LoraFileError naming the file, and reading needs one copy of the file in memory."""

import copy
import json
import struct
import subprocess
import sys

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.files import safetensors as safetensors_io


def test_safetensors_matches_the_reference_library(tmp_path):
    from safetensors.torch import load_file, save_file

    t = {"a": torch.randn(3, 4), "b": torch.randn(2).to(torch.bfloat16), "c": torch.arange(5)}
    safetensors_io.write(tmp_path / "ours.safetensors", t, {"k": "v"})
    theirs = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(theirs[k], v) for k, v in t.items())
    save_file(t, tmp_path / "ref.safetensors")
    ours, _ = safetensors_io.read(tmp_path / "ref.safetensors")
    assert all(torch.equal(ours[k], v) for k, v in t.items())


def _header_file(path, header, data=b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
DEEP = b"[" * 100_000 + b"]" * 100_000

# every malformed file docs/reliability.md lists; the needles are the safetensors library's reasons (and our hints)
CORRUPT = {
    "empty": (b"", "header too small"),
    "shorter than the length field": (b"\x01\x02\x03", "header too small"),
    "header length past the end": (struct.pack("<Q", 100) + b"{}", "header runs past the end of the file: truncated"),
    "huge header length": (struct.pack("<Q", 2**63) + b"{}", "header too large"),
    "header not JSON": (({"raw": b"{not json"}), "invalid JSON in header"),
    "header not UTF-8": (({"raw": b"\xff\xfe{}"}), "invalid UTF-8 in header"),
    "header not an object": (({"header": [1, 2]}), "invalid JSON in header"),
    "entry not an object": (({"header": {"a": [1, 2]}}), "invalid JSON in header"),
    "deeply nested JSON": (({"raw": DEEP}), "invalid JSON in header"),
    "data truncated": (({"header": {"a": F32x2}, "data": b"\0" * 4}), "truncated, or extra bytes"),
    "extra bytes after the data": (({"header": {"a": F32x2}, "data": b"\0" * 12}), "truncated, or extra bytes"),
    "wrong byte count for the shape": (
        ({"header": {"a": {**F32x2, "data_offsets": [0, 4]}}, "data": b"\0" * 8}),
        "invalid shape, data type, or offset",
    ),
    "overlapping offsets": (
        ({"header": {"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, "data": b"\0" * 12}),
        "invalid offset for tensor `b`",
    ),
    "gap before the data": (
        ({"header": {"a": {**F32x2, "data_offsets": [4, 12]}}, "data": b"\0" * 12}),
        "invalid offset for tensor `a`",
    ),
    "unknown dtype": (({"header": {"a": {**F32x2, "dtype": "Q4"}}, "data": b"\0" * 8}), "unknown variant `Q4`"),
    "negative shape": (({"header": {"a": {**F32x2, "shape": [-2]}}, "data": b"\0" * 8}), "integer `-2`"),
    "bad data_offsets": (({"header": {"a": {**F32x2, "data_offsets": [8]}}, "data": b"\0" * 8}), "invalid length 1"),
    "bad metadata": (({"header": {"__metadata__": {"k": 1}}}), "invalid JSON in header"),
    "huge shape claim": (({"header": {"a": {**F32x2, "shape": [2**40, 2**40]}}, "data": b"\0" * 8}), "overflow"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_safetensors_refused_naming_the_file(case, tmp_path):
    content, needle = CORRUPT[case]
    path = tmp_path / "adapter_model.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        _header_file(path, content.get("raw", content.get("header")), content.get("data", b""))
    with pytest.raises(lk.LoraFileError) as e:
        safetensors_io.read(path)
    assert str(e.value).startswith(f"{path}: not a valid safetensors file: ")
    assert needle in str(e.value)
    lk.save_adapters(lk.apply_lora(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(rank=2), ["0"]), tmp_path / "ok")
    (tmp_path / "ok" / "adapter_model.safetensors").write_bytes(path.read_bytes())
    model = nn.Sequential(nn.Linear(4, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lk.LoraFileError, match="adapter_model.safetensors: not a valid safetensors file"):
        lk.load_adapters(model, tmp_path / "ok")
    assert type(model[0]) is nn.Linear and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_write_stores_views_shared_and_odd_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    t = {
        "w": base,
        "tied": base,
        "t": base.t(),
        "row": base[1],
        "bf16": base.to(torch.bfloat16),
        "ints": torch.arange(3),
        "flags": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "param": nn.Parameter(torch.ones(2)),
    }
    safetensors_io.write(tmp_path / "x.safetensors", t, {"k": "v"})
    back, meta = safetensors_io.read(tmp_path / "x.safetensors")
    assert meta == {"k": "v"} and back.keys() == t.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v.detach()) for k, v in t.items())


READ_PEAK = r"""
import re, sys
import torch
from lorakit.files import safetensors as safetensors_io
def kib(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # start the peak (VmHWM) afresh: imports above may have peaked higher
before = kib("VmRSS")
tensors, _ = safetensors_io.read(sys.argv[1])
assert sum(float(t.sum()) for t in tensors.values()) > 0  # every byte really read
print((kib("VmHWM") - before) * 1024)
"""


@pytest.mark.slow
def test_reading_needs_one_copy_of_the_file_not_two(tmp_path):
    """The peak memory of reading a 64 MiB file, in a fresh process, is about the file's size."""
    path = tmp_path / "big.safetensors"
    safetensors_io.write(path, {f"t{i}": torch.full((1024, 1024), float(i + 1)) for i in range(16)})
    size = path.stat().st_size
    run = subprocess.run([sys.executable, "-c", READ_PEAK, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    grown = int(run.stdout)
    assert 0.9 * size < grown < 1.3 * size, f"reading {size >> 20} MiB raised the peak RSS by {grown >> 20} MiB"
