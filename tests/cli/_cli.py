"""Helpers of the `lorakit` command tests: the command in a subprocess, training rows, logits on fixed ids.

Import after `sys.path.insert(0, <this directory>)` (and of tests/, for `_hf_models`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

DATA = Path(__file__).parents[1] / "data"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def lorakit(*args, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout
    )


class Beside:
    """`lorakit ARGS` started in the background, so that a test does its other runs meanwhile, on the machine's other
    core (an uninterrupted run beside the killed and resumed one it is compared with). Its stdout and stderr go to
    files under `logs`, so a full pipe never holds it up. A context manager: leaving it early kills the process."""

    def __init__(self, args: list, env: dict[str, str], logs: Path) -> None:
        logs.mkdir(parents=True)
        self.stdout, self.stderr = logs / "stdout.txt", logs / "stderr.txt"
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lorakit", *map(str, args)], stdout=out, stderr=err, text=True, env=env
            )

    def result(self, timeout: int = 300) -> subprocess.CompletedProcess:
        """Wait for the process to end: its exit status and output, as `subprocess.run` gives them."""
        code = self.proc.wait(timeout=timeout)
        return subprocess.CompletedProcess(self.proc.args, code, self.stdout.read_text(), self.stderr.read_text())

    def __enter__(self) -> Beside:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:  # the test failed before waiting for it: no process outlives the test
            self.proc.kill()
            self.proc.wait()


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _causal_rows(n: int = 24) -> list[dict]:
    qa = [
        ("question : what is two plus two ? answer :", "four"),
        ("question : what colour is the sky ? answer :", "blue"),
    ]
    rows = [{"prompt": q, "completion": a} for q, a in qa] * 4
    return rows + [{"text": s} for s in _hf_models.SENTENCES] * 2


IDS = torch.tensor([[2, 4, 5, 6, 7, 8], [2, 9, 10, 11, 0, 0]])


MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def in_process(capsys, *args) -> tuple[int, str, str]:
    """`lorakit ARGS` called in this process through `main`, the function `python -m lorakit` exits with:
    (status, stdout, stderr). For checks that end before a model loads, where a process start is most of the cost;
    an argparse exit (a usage error, --help) gives its code as the status."""
    from lorakit.cli import main

    capsys.readouterr()  # what the test printed before is not this command's
    try:
        status = main([str(a) for a in args])
    except SystemExit as e:
        status = e.code
    got = capsys.readouterr()
    return status, got.out, got.err
