"""`lorakit example` as a user runs it: a real process, piped (not a terminal), exit codes that mean something."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.files import safetensors as safetensors_io

sys.path.insert(0, str(Path(__file__).parent))
from _cli import Beside  # noqa: E402  (a check beside another)

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n: colours, cursor moves, \r
ENV = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "80"}  # a colour terminal, but stdout is a pipe


def lorakit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


@pytest.fixture(scope="module")
def piped(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("cli") / "run"
    return lorakit("example", "--epochs", "2", "--artifact-dir", str(out), "--seed", "1"), out


def test_piped_run_passes_and_logs_plain_lines(piped) -> None:
    proc, out = piped
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not CONTROL.search(proc.stdout), repr(CONTROL.search(proc.stdout))
    lines = proc.stdout.splitlines()
    assert any(line.startswith("start device=cpu precision=fp32 epochs=2 ") for line in lines)
    assert sum(line.startswith("epoch epoch=") for line in lines) == 2
    assert any(line.startswith("done steps=") for line in lines)
    assert re.search(r"task B loss: base \d+\.\d+ → LoRA \d+\.\d+", proc.stdout)
    assert "rank 4, alpha 8, scaling 2" in proc.stdout
    assert "(identical) ok" in proc.stdout and lines[-1].startswith("all checks passed")
    for name in (
        "base_model.safetensors",
        "adapter/adapter_model.safetensors",
        "train/metrics.jsonl",
        "train/loss.png",
        "train/config.json",
    ):
        assert (out / name).is_file(), name


def test_check_only_exits_non_zero_on_a_tampered_adapter(piped, tmp_path: Path) -> None:
    proc, out = piped
    assert proc.returncode == 0
    bad = Path(shutil.copytree(out, tmp_path / "bad"))
    path = bad / "adapter/adapter_model.safetensors"
    tensors, meta = safetensors_io.read(path)
    key = "base_model.model.fc1.lora_A.weight"
    tensors[key] = tensors[key] * torch.tensor(1.01)
    safetensors_io.write(path, tensors, meta)
    # the check of the untouched run beside the check of the tampered copy: two processes, one core each
    with Beside(["example", "--check-only", "--artifact-dir", out], ENV, tmp_path / "good-log") as checking:
        tampered = lorakit("example", "--check-only", "--artifact-dir", str(bad))  # two at once: the default 120 s
        good = checking.result(timeout=120)
    assert good.returncode == 0, good.stdout + good.stderr
    assert tampered.returncode == 1
    assert "reload FAILED" in tampered.stdout and "the adapter file changed since it was saved" in tampered.stdout


def test_bad_usage_exits_with_a_message(capsys: pytest.CaptureFixture) -> None:
    from lorakit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["example", "--epochs", "0"])
    assert exit_.value.code == 2 and "--epochs: 0 is not a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["example", "--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    for flag in ("--epochs", "--rank", "--alpha", "--device", "--artifact-dir", "--seed", "--check-only"):
        assert flag in shown
    if not torch.cuda.is_available():
        assert main(["example", "--device", "cuda"]) == 1
        assert "lorakit example: failed: ValueError: device 'cuda'" in capsys.readouterr().err


def test_console_script_without_a_command_shows_usage() -> None:
    script = Path(sys.executable).with_name("lorakit")
    if not script.exists():
        pytest.skip("the lorakit console script is not installed in this environment")
    proc = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "example" in proc.stderr and not proc.stdout
