"""`lorakit finetune` with the trainer flags of issue 13, in real subprocesses: --max-steps, --eval-every,
--reference (the forgetting monitor), --log tensorboard, and the warm-up warning on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _cli import in_process  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def lorakit(*args, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_train")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in _hf_models.SENTENCES * 2), encoding="utf-8")
    reference = root / "reference.txt"
    reference.write_text(
        "the quick brown fox jumps over the lazy dog\nhello world\ngood morning\n" * 3, encoding="utf-8"
    )
    return {"model": _hf_models.save_tiny("gpt2", root / "gpt2"), "data": data, "reference": reference}


def _base(files: dict[str, Path], out: Path) -> list:
    return [
        "finetune",
        "--model",
        files["model"],
        "--data",
        files["data"],
        "--task",
        "causal-lm",
        "--out",
        out,
        "--plain",
        "--batch-size",
        "4",
        "--max-length",
        "16",
        "--lr",
        "1e-2",
        "--log-every",
        "1",
    ]


def test_max_steps_eval_every_reference_and_tensorboard(tmp_path: Path, files: dict[str, Path]) -> None:
    out = tmp_path / "a1"
    r = lorakit(
        *_base(files, out),
        "--max-steps",
        "7",
        "--eval-every",
        "2",
        "--reference",
        files["reference"],
        "--log",
        "tensorboard",
        "--warmup-steps",
        "3",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if not line.startswith("targets ")]  # what each rule matched
    assert lines[0].startswith("setup ") and lines[1].startswith("start ")  # the setup line, then the trainer's
    assert " steps=7 " in lines[1]  # 18 rows, batch 4
    evals = [line for line in lines if line.startswith("eval ")]
    assert [line.split()[2] for line in evals] == ["step=2/7", "step=4/7", "step=6/7"]
    assert all(" kl_ref=" in line and " valid_loss=" in line for line in evals)
    assert any(line.startswith("done steps=7 ") for line in lines)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows if r["kind"] != "step"] == [
        ("eval", 2),
        ("eval", 4),
        ("epoch", 5),
        ("eval", 6),
        ("epoch", 7),
    ]
    assert all(r["kl_ref"] >= 0 for r in rows if r["kind"] != "step") and rows[-1]["kl_ref"] > 0
    assert list((out / "run" / "tensorboard").glob("events.out.tfevents.*"))
    report = json.loads((out / "run" / "finetune_report.json").read_text())
    assert report["steps"] == 7 and report["reference"] == str(files["reference"])
    assert report["train"]["max_steps"] == 7 and report["train"]["eval_every"] == 2
    assert "warning" not in r.stderr.lower()  # 3 warm-up steps of 7: nothing to say


def test_warmup_longer_than_the_run_is_a_warning_on_stderr(tmp_path: Path, files: dict[str, Path]) -> None:
    r = lorakit(*_base(files, tmp_path / "a2"), "--max-steps", "2", "--warmup-steps", "5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "UserWarning: warmup_steps=5 is not shorter than the run's 2 optimizer steps" in r.stderr


def test_bad_trainer_flags_exit_2_naming_them(tmp_path: Path, files: dict[str, Path], capsys) -> None:
    """In process (`in_process`): each is refused before a model loads; the real process is in the tests above."""
    status, _, err = in_process(capsys, *_base(files, tmp_path / "a3"), "--max-steps", "0")
    assert status == 2 and "argument --max-steps: 0 is not a positive integer" in err, err
    status, _, err = in_process(capsys, *_base(files, tmp_path / "a4"), "--reference", tmp_path / "nope.txt")
    assert status == 2 and "nope.txt: the reference text file does not exist" in err, err
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    status, _, err = in_process(capsys, *_base(files, tmp_path / "a5"), "--reference", tmp_path / "latin1.txt")
    assert status == 2 and "latin1.txt: the reference text is not UTF-8" in err, err
    assert not (tmp_path / "a4").exists() and not (tmp_path / "a5").exists()
