"""PEFT 0.18.1, the last PEFT writing the pre-0.19 layout of `target_parameters` adapters, beside the PEFT installed.

`scripts/setup.sh dev` installs it with `pip install --no-deps --target <venv>/peft018` (it runs with the venv's
transformers); `ensure()` installs it there the same way where it is missing, once. A child Python with that
directory first on PYTHONPATH imports it instead of the installed PEFT: `write_adapters` runs tests/_peft_writer.py
so, for all its jobs in one process. Import after `sys.path.insert(0, tests_dir)`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VERSION = "0.18.1"
TESTS = Path(__file__).parent


def target() -> Path:
    """Where setup.sh puts PEFT 0.18.1: beside the venv's site-packages, never on its import path."""
    return Path(sys.prefix) / "peft018"


def ensure() -> Path:
    """The directory holding PEFT 0.18.1, installed there first if missing (into a temporary one, then renamed)."""
    where = target()
    if (where / "peft" / "__init__.py").is_file():
        return where
    tmp = Path(tempfile.mkdtemp(prefix="peft018-", dir=where.parent))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
    subprocess.run([*cmd, "--target", str(tmp), f"peft=={VERSION}"], check=True)
    try:
        tmp.rename(where)
    except OSError:  # another process installed it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return where


def write_adapters(out: Path, jobs: list[dict]) -> str:
    """Run every job of tests/_peft_writer.py under PEFT 0.18.1 in one child Python; returns its output."""
    path = [str(ensure()), str(TESTS), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    done = subprocess.run(
        [sys.executable, str(TESTS / "_peft_writer.py"), str(out), json.dumps(jobs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0 or f"peft {VERSION}" not in done.stdout:
        raise RuntimeError(f"PEFT {VERSION} writer failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}")
    return done.stdout
