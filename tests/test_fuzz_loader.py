"""Fuzz the adapter loaders: random and mutated files give lorakit's own clear errors, nothing else."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit as lk
from lorakit.files import peft_format
from lorakit.files import safetensors as safetensors_io
from lorakit.saving import layer_tensors

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def valid_file() -> bytes:
    layer = lk.with_lora(nn.Linear(6, 5), lk.LoraConfig(rank=2, alpha=3))
    return safetensors.torch.save(
        layer_tensors(layer),
        {"format": "lorakit-layer", "layer": "LoraLinear", "config": json.dumps(layer.config.to_dict())},
    )


VALID = valid_file()


@st.composite
def mutated(draw):
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "length" and len(data) >= 8:
            data[:8] = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    return bytes(data)


@FUZZ
@given(st.one_of(st.binary(max_size=512), mutated()))
def test_read_only_raises_lorakit_errors(tmp_path, data):
    path = tmp_path / "a.safetensors"
    path.write_bytes(data)
    try:
        safetensors_io.read(path)
    except lk.LoraFileError as e:
        assert str(e).startswith(f"{path}: ")


@FUZZ
@given(mutated())
def test_layer_load_only_raises_lorakit_errors_and_changes_nothing(tmp_path, data):
    path = tmp_path / "a.safetensors"
    path.write_bytes(data)
    layer = lk.with_lora(nn.Linear(6, 5), lk.LoraConfig(rank=2))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    try:
        layer.load_adapter(path)
        return  # a mutation that kept the file valid
    except lk.LoraFileError:
        pass
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8,
)
KEYS = [
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "bias",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "exclude_modules",
    "init_lora_weights",
    "peft_type",
    "fan_in_fan_out",
]


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), JSON, max_size=5))
def test_config_fuzz_only_raises_lorakit_errors(tmp_path, changes):
    model = lk.apply_lora(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), lk.LoraConfig(rank=2), ["0"])
    lk.save_adapters(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(changes)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    try:
        lk.load_adapters(fresh, tmp_path)
    except lk.LoraFileError:
        assert not lk.lora_layers(fresh)


def test_deeply_nested_json_is_a_clear_error(tmp_path):
    deep = b"[" * 100_000 + b"]" * 100_000
    (tmp_path / "a.safetensors").write_bytes(len(deep).to_bytes(8, "little") + deep)
    with pytest.raises(lk.LoraFileError, match="a.safetensors: not a valid safetensors file: .*invalid JSON"):
        safetensors_io.read(tmp_path / "a.safetensors")
    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_config.json").write_bytes(deep)
    with pytest.raises(lk.LoraFileError, match="not valid JSON"):
        peft_format.read_adapter_config(d)


@pytest.mark.parametrize("shape", [[2**40, 2**40], [2**20, 2**20]])
def test_huge_shape_claims_allocate_nothing(shape, tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}}).encode()
    (tmp_path / "a.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(lk.LoraFileError, match="a.safetensors: not a valid safetensors file"):
        safetensors_io.read(tmp_path / "a.safetensors")


@pytest.mark.skipif(not any((Path(p) / "atheris").exists() for p in sys.path), reason="atheris not installed")
def test_atheris_coverage_guided_fuzz(tmp_path):
    """libFuzzer via atheris for a few seconds over read + layer load; any non-lorakit exception fails."""
    script = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_loader.py"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    run = subprocess.run(
        [sys.executable, str(script), "-max_total_time=15", "-seed=1", f"-artifact_prefix={tmp_path}/"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
