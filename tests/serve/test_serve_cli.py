"""`lorakit serve`'s bad input: exit 2 with a message naming the flag, before anything listens."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _serving  # noqa: E402


def _serve(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit", "serve", "--port", "0", *map(str, args)],
                          capture_output=True, text=True, env=_serving.ENV, timeout=120)


def test_bad_flags_exit_2_naming_them(tmp_path):
    model = _serving.tiny_chat_llama(tmp_path / "llama")
    r = _serve("--model", tmp_path / "nope")
    assert r.returncode == 2 and "nope" in r.stderr and not r.stdout
    r = _serve("--model", model, "--adapter", f"x={tmp_path / 'missing'}")
    assert r.returncode == 2 and "adapter 'x'" in r.stderr and "missing" in r.stderr and not r.stdout
    r = _serve("--model", model, "--adapter-root", tmp_path / "no-root")
    assert r.returncode == 2 and "--adapter-root" in r.stderr
    r = _serve("--model", model, "--max-batch", "0")
    assert r.returncode == 2 and "--max-batch" in r.stderr
