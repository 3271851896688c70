"""The MLP example, in process: its figures, its artifacts, determinism, and checks that fail when they should."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from lorakit.examples.mlp_example import ExampleOptions, check_artifacts, run
from lorakit.files import safetensors as safetensors_io

SMALL = dict(epochs=3, pretrain_epochs=4, device="cpu", seed=3)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("example")
    assert run(ExampleOptions(artifact_dir=out, **SMALL)) == 0
    torch.set_num_threads(threads)  # the example pins one thread for itself; give the rest of the suite its own
    return out


def test_artifacts_are_all_there(finished: Path) -> None:
    for name in (
        "base_model.safetensors",
        "probe.safetensors",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "train/config.json",
        "train/metrics.jsonl",
        "train/loss.png",
        "train/checkpoint.safetensors",
        "train/adapter/adapter_model.safetensors",
        "train/best_adapter/adapter_model.safetensors",
    ):
        assert (finished / name).is_file(), name
    config = json.loads((finished / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 8.0, ["fc1", "fc2"])
    # the final trained adapter, the trainer's copy and the example's own save are the same bytes
    assert (finished / "adapter/adapter_model.safetensors").read_bytes() == (
        finished / "train/adapter/adapter_model.safetensors"
    ).read_bytes()


def test_report_figures(finished: Path, capsys: pytest.CaptureFixture) -> None:
    assert check_artifacts(finished)
    out = capsys.readouterr().out
    assert "max |diff| 0 (identical) ok" in out
    assert "merged vs unmerged: max |diff|" in out and "FAILED" not in out


def test_same_seed_same_adapter(finished: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    assert run(ExampleOptions(artifact_dir=tmp_path, **SMALL)) == 0
    torch.set_num_threads(threads)
    for name in ("base_model.safetensors", "adapter/adapter_model.safetensors"):
        assert (tmp_path / name).read_bytes() == (finished / name).read_bytes(), name


def _copy(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "copy"))


def _tamper(path: Path, key: str, change) -> None:
    tensors, meta = safetensors_io.read(path)
    tensors[key] = change(tensors[key].clone())
    safetensors_io.write(path, tensors, meta)


@pytest.mark.parametrize(
    "what, change, message",
    [
        # lorakit.json holds the saved tensors' hashes: the reload itself refuses a changed file
        ("changed weights", lambda t: t + 1e-3, "reload FAILED: " + "%s: the adapter file changed since it was saved"),
        # without lorakit.json (a PEFT-made adapter) the file loads, and the outputs check catches it
        ("changed weights, lorakit.json removed", lambda t: t + 1e-3, "FAILED: outputs differ"),
        ("a NaN", lambda t: t.index_fill_(0, torch.tensor([1]), float("nan")), "reload FAILED"),
        ("another shape", lambda t: t[:, :2], "reload FAILED"),
    ],
)
def test_tampered_adapter_fails_the_checks(finished: Path, tmp_path: Path, capsys, what, change, message) -> None:
    out = _copy(finished, tmp_path)
    _tamper(out / "adapter/adapter_model.safetensors", "base_model.model.fc2.lora_B.weight", change)
    if "removed" in what:
        (out / "adapter/lorakit.json").unlink()
    message = message.replace("%s", str(out / "adapter/adapter_model.safetensors"))
    assert not check_artifacts(out), what
    assert message in capsys.readouterr().out


def test_truncated_or_missing_files_fail_the_checks(finished: Path, tmp_path: Path, capsys) -> None:
    out = _copy(finished, tmp_path)
    data = (out / "adapter/adapter_model.safetensors").read_bytes()
    (out / "adapter/adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    assert not check_artifacts(out)
    (out / "adapter/adapter_model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    assert not check_artifacts(out)
    (out / "base_model.safetensors").unlink()
    assert not check_artifacts(out)
    assert capsys.readouterr().out.count("reload FAILED") == 3
