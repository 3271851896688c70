"""SIGKILL the real CLI mid-run, resume, and end with exactly the adapter of an uninterrupted run."""

import os
import signal
import subprocess
import sys
from pathlib import Path

LORAKIT = [sys.executable, "-m", "lorakit"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def adapter_bytes(d: Path) -> bytes:
    return (d / "adapter_model.safetensors").read_bytes()


def run_until(cmd: list[str], marker: str) -> str:
    """Start `cmd`, SIGKILL it right after a stdout line starting with `marker`; returns what it printed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(marker):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    return "".join(seen)


def test_example_killed_mid_finetune_resumes_to_the_same_adapter(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = ["example", "--epochs", "6"]
    ok = subprocess.run(LORAKIT + args + ["--artifact-dir", str(whole)], capture_output=True, text=True, env=ENV)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    printed = run_until(LORAKIT + args + ["--artifact-dir", str(killed)], "checkpoint step=160 ")
    assert "step=384/384" not in printed  # killed part-way through the fine-tune
    assert not (killed / "adapter").exists()
    resumed = subprocess.run(LORAKIT + args + ["--artifact-dir", str(killed), "--resume"],
                             capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed_at_step=" in resumed.stdout and "all checks passed" in resumed.stdout
    assert adapter_bytes(killed / "adapter") == adapter_bytes(whole / "adapter")


def test_finetune_killed_mid_run_resumes_to_the_same_adapter(tmp_path):
    import json

    sys.path.insert(0, str(Path(__file__).parent))
    import _hf_models

    model_dir = _hf_models.save_tiny("gpt2", tmp_path / "gpt2")
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps({"text": s}) + "\n" for s in _hf_models.SENTENCES * 6))
    args = ["finetune", "--model", str(model_dir), "--data", str(rows), "--task", "causal-lm", "--epochs", "4",
            "--batch-size", "4", "--device", "cpu", "--plain", "--checkpoint-every", "2", "--dropout", "0.1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    ok = subprocess.run(LORAKIT + args + ["--out", str(whole)], capture_output=True, text=True, env=ENV)
    assert ok.returncode == 0, ok.stderr[-2000:]
    total = json.loads((whole / "run" / "config.json").read_text())["total_steps"]
    printed = run_until(LORAKIT + args + ["--out", str(killed)], "checkpoint step=6 ")
    assert f"step={total}/{total}" not in printed
    resumed = subprocess.run(LORAKIT + args + ["--out", str(killed), "--resume"], capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed_at_step=" in resumed.stdout
    assert adapter_bytes(killed) == adapter_bytes(whole)
