"""examples/mlp_lora.py, the copyable script, still runs to the end (its own asserts are its checks)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "mlp_lora.py"


def test_script_runs(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reload: identical outputs; merge: max |diff|" in proc.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "train" / "loss.png").is_file()
