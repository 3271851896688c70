"""The TensorBoard callback: its event files, read back with TensorBoard's own reader, hold metrics.jsonl's numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lorakit.train import TensorBoard, Trainer

sys.path.insert(0, str(Path(__file__).parent))
import tiny_run  # noqa: E402

sys.path.pop(0)


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _fit(out: Path, cfg, *callbacks, **kwargs) -> None:
    model, train, valid = tiny_run.build()
    Trainer(
        model,
        cfg,
        loss_fn=nn.functional.mse_loss,
        callbacks=[TensorBoard(), *callbacks],
        artifact_dir=out,
        metrics={"mae": lambda o, y: (o - y).abs().mean()},
    ).fit(train, valid, **kwargs)


def test_scalars_match_metrics_jsonl(tmp_path: Path) -> None:
    cfg = tiny_run.CONFIG.__class__(
        **{**tiny_run.CONFIG.to_dict(), "betas": (0.9, 0.999), "max_steps": 16, "eval_every": 5, "log_every": 2}
    )
    _fit(tmp_path, cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    got = _scalars(tmp_path / "tensorboard")
    steps = [r for r in rows if r["kind"] == "step"]
    evals = [r for r in rows if r["kind"] in ("eval", "epoch")]

    def check(tag: str, want: list[tuple[int, float]]) -> None:
        assert [s for s, _ in got[tag]] == [s for s, _ in want], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want], rel=1e-6), tag  # stored as fp32

    check("train/loss", [(r["step"], r["loss"]) for r in steps])
    check("train/lr", [(r["step"], r["lr"]) for r in steps])
    check("train/grad_norm", [(r["step"], r["grad_norm"]) for r in steps])
    check("train/mae", [(r["step"], r["mae"]) for r in steps])
    check("valid/loss", [(r["step"], r["valid_loss"]) for r in evals])
    check("valid/mae", [(r["step"], r["valid_mae"]) for r in evals])
    check("epoch/train_loss", [(r["step"], r["train_loss"]) for r in rows if r["kind"] == "epoch"])
    assert [s for s, _ in got["valid/loss"]] == [5, 10, 12, 15, 16]


def test_without_an_artifact_dir_or_log_dir_it_says_what_it_needs(tmp_path: Path) -> None:
    model, train, _ = tiny_run.build()
    with pytest.raises(ValueError, match="TensorBoard\\(\\) needs a log_dir, or a Trainer with an artifact_dir"):
        Trainer(model, tiny_run.CONFIG, loss_fn=nn.functional.mse_loss, callbacks=[TensorBoard()]).fit(train)
    callback = TensorBoard(tmp_path / "tb")
    model, train, _ = tiny_run.build()
    Trainer(model, tiny_run.CONFIG, loss_fn=nn.functional.mse_loss, callbacks=[callback]).fit(train)
    assert [s for s, _ in _scalars(tmp_path / "tb")["train/loss"]] == list(range(1, 37))


@pytest.mark.slow
def test_a_missing_tensorboard_package_names_the_extra() -> None:
    # a real interpreter in which `tensorboard` cannot be imported (a None entry in sys.modules blocks it)
    code = (
        "import sys; sys.modules['tensorboard'] = None\n"
        "from lorakit.train import TensorBoard\n"
        "try:\n    TensorBoard()\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "pip install 'lorakit[tensorboard]'" in out


class _Crash(Exception):
    pass


def test_a_resumed_run_purges_the_steps_after_its_checkpoint(tmp_path: Path) -> None:
    from lorakit.train import StepLogged

    def crash_at_11(event: object) -> None:  # two steps past the checkpoint at 9: steps 10 and 11 are logged twice
        if isinstance(event, StepLogged) and event.step == 11:
            raise _Crash

    with pytest.raises(_Crash):
        _fit(tmp_path, tiny_run.CONFIG, crash_at_11)
    _fit(tmp_path, tiny_run.CONFIG, resume=True)
    steps = [s for s, _ in _scalars(tmp_path / "tensorboard")["train/loss"]]
    assert steps == list(range(1, 37))
