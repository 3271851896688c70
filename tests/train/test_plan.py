"""max_steps, eval_every and the warm-up check: when a run stops, evaluates and warns; resuming a max_steps run."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit.train import CheckpointSaved, EpochEnded, Evaluated, RunEnded, RunStarted, TrainConfig, Trainer
from lorakit.train.plan import RunPlan

MAE = {"mae": lambda out, y: (out - y).abs().mean()}
VOLATILE = {"elapsed_s", "throughput"}


def _tiny_run():
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        import tiny_run
    finally:
        sys.path.pop(0)
    return tiny_run


def _config(**changes) -> TrainConfig:
    return TrainConfig(**{**_tiny_run().CONFIG.to_dict(), "betas": (0.9, 0.999), **changes})


def _fit(out: Path | None, cfg: TrainConfig, events: list | None = None, resume: bool = False, callbacks=()):
    model, train, valid = _tiny_run().build()  # 24 batches, grad_accum 2: 12 steps per epoch; LoRA dropout 0.1
    cbs = [events.append] if events is not None else []
    Trainer(
        model, cfg, loss_fn=nn.functional.mse_loss, callbacks=[*cbs, *callbacks], metrics=MAE, artifact_dir=out
    ).fit(train, valid, resume=resume)
    return model


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _trained(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def max_steps_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    out, events = tmp_path_factory.mktemp("max_steps"), []
    _fit(out, _config(max_steps=20, eval_every=5, checkpoint_every=3), events)
    return out, events


def test_max_steps_overrides_epochs_and_ends_like_a_run(max_steps_run: tuple[Path, list]) -> None:
    out, events = max_steps_run
    start, end = events[0], events[-1]
    assert isinstance(start, RunStarted) and (start.epochs, start.total_steps) == (2, 20)  # CONFIG says 3 epochs
    assert isinstance(end, RunEnded) and end.step == 20 and end.valid_loss is not None
    ended = [e for e in events if isinstance(e, EpochEnded)]
    assert [(e.epoch, e.step) for e in ended] == [(1, 12), (2, 20)]  # the second epoch stops at step 20 of 24
    assert [e.step for e in events if isinstance(e, Evaluated)] == [5, 10, 15]  # 20 is the last epoch's own
    rows = _rows(out)
    assert max(r["step"] for r in rows) == 20
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [5, 10, 15]
    evaluations = [r for r in rows if r["kind"] in ("eval", "epoch")]
    assert rows[-1]["best_valid_loss"] == min(r["valid_loss"] for r in evaluations)  # best over every evaluation
    for name in ("adapter/adapter_model.safetensors", "best_adapter/adapter_model.safetensors", "loss.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["total_steps"] == 20
    saved = [e.step for e in events if isinstance(e, CheckpointSaved)]
    assert saved == [3, 6, 9, 12, 15, 18, 20]  # every 3 steps, each epoch's end, and the run's end


class _Crash(Exception):
    pass


def test_a_max_steps_run_resumes_from_a_mid_epoch_checkpoint_to_the_same_bytes(
    max_steps_run: tuple[Path, list], tmp_path: Path
) -> None:
    whole, _ = max_steps_run

    def crash_at_15(event: object) -> None:  # mid-epoch 2, after the evaluation at 15 and its checkpoint
        if isinstance(event, CheckpointSaved) and event.step == 15:
            raise _Crash

    cfg = _config(max_steps=20, eval_every=5, checkpoint_every=3)
    with pytest.raises(_Crash):
        _fit(tmp_path, cfg, callbacks=[crash_at_15])
    assert not (tmp_path / "adapter").exists()
    events: list = []
    _fit(tmp_path, cfg, events, resume=True)
    assert events[0].start_step == 15 and events[-1].step == 20
    for name in ("adapter/adapter_model.safetensors", "best_adapter/adapter_model.safetensors"):
        assert (tmp_path / name).read_bytes() == (whole / name).read_bytes(), name
    assert _rows(tmp_path) == _rows(whole)


def test_evaluating_more_often_does_not_change_the_training() -> None:
    """Evaluations put the random streams back (the LoRA dropout draws from them), so eval_every only adds rows."""
    plain = _trained(_fit(None, _config(epochs=2)))
    often = _trained(_fit(None, _config(epochs=2, eval_every=1)))
    assert all(torch.equal(plain[n], often[n]) for n in plain)


def test_warmup_longer_than_the_run_warns_naming_both_numbers() -> None:
    with pytest.warns(UserWarning, match=r"warmup_steps=30 is not shorter than the run's 24 optimizer steps"):
        _fit(None, _config(epochs=2, warmup_steps=30))
    with pytest.warns(UserWarning, match=r"warmup_steps=10 .* run's 10 optimizer steps"):
        _fit(None, _config(max_steps=10, warmup_steps=10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit(None, _config(max_steps=11, warmup_steps=10))


def test_plan_arithmetic_and_config_checks() -> None:
    plan = RunPlan.of(TrainConfig(epochs=3, grad_accum=2, eval_every=4, checkpoint_every=6), batches_per_epoch=7)
    assert (plan.steps_per_epoch, plan.epochs, plan.total_steps) == (4, 3, 12)
    assert [s for s in range(1, 13) if plan.eval_due(s)] == [4, 8, 12]
    assert plan.ends_epoch(7, 4) and not plan.ends_epoch(6, 3) and plan.ends_epoch(3, 12)
    assert RunPlan.of(TrainConfig(max_steps=9), batches_per_epoch=4).epochs == 3
    assert TrainConfig(eval_every=None).eval_every == 0
    with pytest.raises(ValueError, match="TrainConfig.max_steps=0 is invalid"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="TrainConfig.eval_every=-1 is invalid"):
        TrainConfig(eval_every=-1)
    with pytest.raises(ValueError, match="no batches"):
        RunPlan.of(TrainConfig(), batches_per_epoch=0)
    model, train, _ = _tiny_run().build()
    trainer = Trainer(model, _config(eval_every=3), loss_fn=nn.functional.mse_loss, callbacks=[])
    with pytest.raises(ValueError, match=r"eval_every=3 has nothing to evaluate"):
        trainer.fit(train)
