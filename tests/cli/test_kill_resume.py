"""SIGKILL the real CLI mid-run, resume, and end with exactly the adapter of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

TESTS = Path(__file__).parents[1]
sys.path.insert(0, str(TESTS))
import _cli_hold  # noqa: E402  (the CLI, blocked for good after a chosen line)

sys.path.insert(0, str(Path(__file__).parent))
from _cli import Beside  # noqa: E402  (the uninterrupted run, in the background)

LORAKIT = [sys.executable, "-m", "lorakit"]
# one thread a process: the uninterrupted run and the killed one run side by side, one core each
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def adapter_bytes(d: Path) -> bytes:
    return (d / "adapter_model.safetensors").read_bytes()


def killed_at(marker: str, args: list[str]) -> list[str]:
    """Run `lorakit ARGS`, held still right after its stdout line starting with `marker`; SIGKILL it there.

    Returns every line it printed, read to the end of its output after the kill.
    """
    held = _cli_hold.signal_at(marker, args, signal.SIGKILL, ENV)
    assert held.returncode == -signal.SIGKILL, "".join(held.seen[-20:]) + held.err
    assert held.rest == "", held.rest[-2000:]  # killed at the marker, not after it
    return held.seen


def checkpoint_step(run_dir: Path) -> int:
    from lorakit.train.checkpoint import read_checkpoint

    return read_checkpoint(run_dir / "checkpoint.safetensors").state["step"]


def test_example_killed_mid_finetune_resumes_to_the_same_adapter(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = ["example", "--epochs", "6"]
    # the uninterrupted run goes on beside the killed one and its resumption
    with Beside(args + ["--artifact-dir", str(whole)], ENV, tmp_path / "whole-log") as running:
        printed = killed_at("checkpoint step=128 ", args + ["--artifact-dir", str(killed)])  # epoch 2 of 6
        assert not any(line.startswith("done ") for line in printed)  # killed part-way through the fine-tune
        assert checkpoint_step(killed / "train") == 128 and not (killed / "adapter").exists()
        resumed = subprocess.run(
            LORAKIT + args + ["--artifact-dir", str(killed), "--resume"], capture_output=True, text=True, env=ENV
        )
        ok = running.result()
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed_at_step=128 " in resumed.stdout and "all checks passed" in resumed.stdout
    assert adapter_bytes(killed / "adapter") == adapter_bytes(whole / "adapter")


def test_finetune_killed_mid_run_resumes_to_the_same_adapter(tmp_path):
    sys.path.insert(0, str(TESTS))
    import _hf_models

    model_dir = _hf_models.save_tiny("gpt2", tmp_path / "gpt2")
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps({"text": s}) + "\n" for s in _hf_models.SENTENCES * 6))
    args = [
        "finetune",
        "--model",
        str(model_dir),
        "--data",
        str(rows),
        "--task",
        "causal-lm",
        "--epochs",
        "4",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--plain",
        "--checkpoint-every",
        "2",
        "--dropout",
        "0.1",
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # the uninterrupted run goes on beside the killed one and its resumption
    with Beside(args + ["--out", str(whole)], ENV, tmp_path / "whole-log") as running:
        printed = killed_at("checkpoint step=6 ", args + ["--out", str(killed)])
        assert not any(line.startswith("done ") for line in printed)
        assert checkpoint_step(killed / "run") == 6 and not (killed / "adapter_model.safetensors").exists()
        resumed = subprocess.run(
            LORAKIT + args + ["--out", str(killed), "--resume"], capture_output=True, text=True, env=ENV
        )
        ok = running.result()
    assert ok.returncode == 0, ok.stderr[-2000:]
    total = json.loads((whole / "run" / "config.json").read_text())["total_steps"]
    assert total > 6  # so step 6 is mid-run
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed_at_step=6 " in resumed.stdout
    assert adapter_bytes(killed) == adapter_bytes(whole)
