"""`lorakit example chat` and the README's "first hour", run as a user runs them: the README's commands as written,
from the venv, in a fresh directory, piped (plain lines). The chat example runs once, shared by the tests here.

CI's setup step ran `bash scripts/setup.sh dev` (the README's second command, which also runs this suite, so it
cannot run inside it: it is checked to be that command). llama-cpp-python is installed there, so the example's
GGUF step must run, not be skipped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import llama_cpp  # noqa: F401  (the GGUF step's runtime: a missing one fails here, never skips)
import pytest

pytestmark = pytest.mark.slow  # subprocesses, a server and an export runtime: not in the fast set

ROOT = Path(__file__).resolve().parents[2]
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n: colours, cursor moves, \r
VENV = Path(sys.executable).parent.parent  # the venv running the tests (not resolved: its bin/ holds lorakit)


def first_hour() -> list[str]:
    """The README's first two bash blocks, comments dropped: the two set-up-and-run commands, then the chat example."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)[:2]
    return [line.split("#")[0].strip() for block in blocks for line in block.strip().splitlines()]


def run_as_written(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """`command` run by bash in `cwd`, where `.venv` is the venv running the tests, stdout piped."""
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "80", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new user's directory: `.venv` is the set-up venv, nothing else."""
    root = tmp_path_factory.mktemp("first-hour")
    (root / ".venv").symlink_to(VENV, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def chat_run(workspace: Path) -> subprocess.CompletedProcess:
    """The README's third command, `lorakit example chat`, run as written (once for the module)."""
    return run_as_written(first_hour()[2], workspace)


@pytest.fixture(scope="module")
def example_run(workspace: Path) -> subprocess.CompletedProcess:
    """The `lorakit example` of the README's first command, run as written."""
    setup, _, example = first_hour()[0].partition(" && ")
    assert setup == "bash scripts/setup.sh", setup  # CI's setup step ran it (with dev); a test does not pip
    return run_as_written(example, workspace)


def test_example_chat_passes_every_check(chat_run: subprocess.CompletedProcess, workspace: Path) -> None:
    assert chat_run.returncode == 0, chat_run.stdout[-4000:] + chat_run.stderr[-3000:]
    out, lines = chat_run.stdout, chat_run.stdout.splitlines()
    assert not CONTROL.search(out), repr(CONTROL.search(out))  # piped: plain lines, no live display
    assert [line[:5] for line in lines if re.match(r"\[\d/6\]", line)] == [f"[{i}/6]" for i in range(1, 7)]
    assert sum(line.startswith("start device=cpu ") for line in lines) == 3  # the trainer's plain log, three runs
    table = {
        m.group(1): [int(m.group(k)) for k in (2, 3, 4)]
        for m in re.finditer(r"^\s+(base|\+ reverse|\+ sort)\s+(\d+)%\s+(\d+)%\s+(\d+)%$", out, re.M)
    }
    assert table["base"][1:] == [0, 0] and table["base"][0] >= 90, table  # the base knows its skill only
    assert table["+ reverse"][1] >= 50 and table["+ sort"][2] >= 50, table
    assert out.count("answers as in process") == 3 and "FAILED" not in out
    assert re.search(r"16 requests sent together; [1-9]\d* of \d+ decode steps ran several requests", out)
    assert lines[-1].startswith("all checks passed in ")
    art = workspace / "artifacts" / "example-chat"
    for name in ("base/config.json", "adapters/reverse/adapter_model.safetensors", "adapters/sort/lorakit.json"):
        assert (art / name).is_file(), name
    assert json.loads((art / "gguf" / "proof.json").read_text())["passed"] is True
    assert (art / "gguf" / "model.gguf").stat().st_size > 0


def test_readme_first_hour_runs_as_written(
    chat_run: subprocess.CompletedProcess, example_run: subprocess.CompletedProcess
) -> None:
    commands = first_hour()
    assert len(commands) == 3
    assert example_run.returncode == 0, example_run.stdout[-3000:] + example_run.stderr[-3000:]
    assert example_run.stdout.splitlines()[-1].startswith("all checks passed")
    # the second command runs this suite: it is the one CI runs (tests/test_readme.py checks .ci/run uses it)
    assert commands[1] == "bash scripts/setup.sh dev && .venv/bin/python -m pytest"
    assert commands[2] == ".venv/bin/lorakit example chat"
    assert chat_run.returncode == 0 and chat_run.stdout.splitlines()[-1].startswith("all checks passed")


def test_example_logs_one_checkpoint_per_epoch(example_run: subprocess.CompletedProcess) -> None:
    lines = example_run.stdout.splitlines()
    epochs = [line for line in lines if line.startswith("epoch epoch=")]
    checkpoints = [line for line in lines if line.startswith("checkpoint step=")]
    fine_tune_epochs = 12  # the default --epochs
    assert len(epochs) == fine_tune_epochs and len(checkpoints) == fine_tune_epochs, checkpoints
    # each checkpoint follows its epoch's line: at the epoch's end, not part-way through
    for epoch, checkpoint in zip(epochs, checkpoints, strict=True):
        assert lines.index(checkpoint) == lines.index(epoch) + 1
        step = re.search(r" step=(\d+)/", epoch).group(1)
        assert checkpoint.startswith(f"checkpoint step={step} ")
