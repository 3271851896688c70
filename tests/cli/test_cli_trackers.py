"""`lorakit finetune --log mlflow | wandb`: a missing library is named with its pip command before anything loads,
and the tracker records the run's flags as its parameters (the metrics themselves: tests/train/test_trackers.py).

The missing library is real: one child Python runs both finetunes through lorakit.cli.main with `mlflow`, then
`wandb`, made unimportable (a None entry in sys.modules, Python's own way).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lorakit.cli import build_parser
from lorakit.cli.finetune import _callbacks
from lorakit.train import MLflow, WandB

pytestmark = pytest.mark.slow  # a subprocess, and the trackers' libraries import slowly

CHILD = """
import json, sys
from lorakit.cli import main

argv = json.loads(sys.argv[1])
for name in ("mlflow", "wandb"):
    sys.modules[name] = None
    print(f"=== {name}", file=sys.stderr, flush=True)
    print(f"=== {name} exit", main([*argv, "--out", sys.argv[2] + "-" + name, "--log", name]), flush=True)
    del sys.modules[name]  # importable again
"""


def _argv(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n", encoding="utf-8")
    return ["finetune", "--model", str(tmp_path / "model"), "--data", str(data), "--task", "causal-lm", "--rank", "2"]


def test_a_missing_tracker_library_is_named_with_its_pip_command_before_anything_loads(tmp_path):
    (tmp_path / "model").mkdir()  # never read: the tracker is made first
    r = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(_argv(tmp_path)), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    errors = dict(part.split("\n", 1) for part in r.stderr.split("=== ")[1:])
    for name in ("mlflow", "wandb"):
        assert f"=== {name} exit 1" in r.stdout and "pip install 'lorakit[track]'" in errors[name], r.stderr
        assert not (tmp_path / f"out-{name}").exists()  # nothing started


@pytest.mark.parametrize("log", ["mlflow", "wandb"])
def test_the_tracker_records_the_runs_flags(tmp_path, log):
    args = build_parser().parse_args([*_argv(tmp_path), "--out", str(tmp_path / "out"), "--log", log, "--plain"])
    (_, tracker) = _callbacks(args)  # as `lorakit finetune` makes it, before anything loads
    assert isinstance(tracker, MLflow if log == "mlflow" else WandB)
    assert tracker.params["rank"] == 2 and tracker.params["log"] == log and tracker.params["task"] == "causal-lm"
    assert tracker.params["model"] == str(tmp_path / "model") and "overwrite" not in tracker.params
