"""The MLflow and Weights & Biases callbacks, offline with the real libraries: the runs read back (MlflowClient on the
local file store; the offline .wandb file with wandb's own Record) hold metrics.jsonl's numbers and the params."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from torch import nn

from lorakit.train import MLflow, Trainer, WandB
from lorakit.train.evaluation import ProbeResult

sys.path.insert(0, str(Path(__file__).parent))
import tiny_run  # noqa: E402
from _wandb_file import read_run  # noqa: E402

sys.path.pop(0)

PARAMS = {"rank": 8, "targets": "fc1", "unset": None}


def _fit(out: Path, max_steps: int, *callbacks, probes=()) -> list[dict]:
    """A tiny run with `callbacks` (and `probes`); its metrics.jsonl rows."""
    cfg = tiny_run.CONFIG.__class__(
        **{**tiny_run.CONFIG.to_dict(), "max_steps": max_steps, "eval_every": 5, "log_every": 2, "warmup_steps": 1}
    )
    model, train, valid = tiny_run.build()
    metrics = {"mae": lambda o, y: (o - y).abs().mean()}
    trainer = Trainer(
        model,
        cfg,
        loss_fn=nn.functional.mse_loss,
        callbacks=list(callbacks),
        artifact_dir=out,
        metrics=metrics,
        probes=list(probes),
    )
    trainer.fit(train, valid)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _expected(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What every tracker must hold, per tag, from metrics.jsonl (as tests/train/test_tensorboard.py checks)."""
    steps = [r for r in rows if r["kind"] == "step"]
    evals = [r for r in rows if r["kind"] in ("eval", "epoch")]
    return {
        "train/loss": [(r["step"], r["loss"]) for r in steps],
        "train/lr": [(r["step"], r["lr"]) for r in steps],
        "train/grad_norm": [(r["step"], r["grad_norm"]) for r in steps],
        "train/mae": [(r["step"], r["mae"]) for r in steps],
        "valid/loss": [(r["step"], r["valid_loss"]) for r in evals],
        "valid/mae": [(r["step"], r["valid_mae"]) for r in evals],
        "epoch/train_loss": [(r["step"], r["train_loss"]) for r in rows if r["kind"] == "epoch"],
    }


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """(artifact dir, metrics.jsonl rows) of one run logged to MLflow and W&B, with neither configured."""
    out = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("WANDB_MODE", raising=False)
        rows = _fit(out, 16, MLflow(PARAMS), WandB(PARAMS))
    return out, rows


def _mlflow_run(uri: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    history = {
        tag: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        for tag in run.data.metrics
    }
    return run, history


def test_mlflow_logs_the_runs_metrics_and_params_to_a_file_store_under_the_artifact_dir(tracked):
    out, rows = tracked
    run, history = _mlflow_run((out / "mlruns").resolve().as_uri())
    want = _expected(rows)
    assert sorted(history) == sorted(want)
    for tag, points in want.items():
        assert [s for s, _ in history[tag]] == [s for s, _ in points], tag
        assert [v for _, v in history[tag]] == pytest.approx([v for _, v in points], rel=1e-12), tag
    assert [s for s, _ in history["valid/loss"]] == [5, 10, 12, 15, 16]
    params = run.data.params
    assert params["rank"] == "8" and params["targets"] == "fc1" and "unset" not in params
    assert params["total_steps"] == "16" and params["device"] == "cpu" and int(params["trainable_params"]) > 0
    assert run.info.status == "FINISHED"


def test_wandb_logs_the_runs_metrics_and_config_offline_under_the_artifact_dir(tracked):
    out, rows = tracked
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    config, history = read_run(run_dir)
    want = _expected(rows)
    assert sorted(history) == sorted(want)
    for tag, points in want.items():
        assert [s for s, _ in history[tag]] == [s for s, _ in points], tag
        assert [v for _, v in history[tag]] == pytest.approx([v for _, v in points], rel=1e-12), tag
    assert config["rank"] == 8 and config["targets"] == "fc1" and "unset" not in config
    assert config["total_steps"] == 16 and config["precision"] == "fp32"


def test_mlflow_tracking_uri_and_wandb_mode_are_honoured(tmp_path, monkeypatch):
    elsewhere = (tmp_path / "elsewhere").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a user's own file store: theirs to allow
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "run"
    rows = _fit(out, 2, MLflow(), WandB())
    assert not (out / "mlruns").exists() and not list(out.glob("wandb/offline-run-*"))
    _, history = _mlflow_run(elsewhere)
    assert history["train/loss"] == [(2, pytest.approx(_expected(rows)["train/loss"][0][1]))]


def test_mlflow_takes_a_metric_whose_name_it_would_refuse(tmp_path, monkeypatch):
    # an answer metric is named as typed (`regex:^[0-9]+$`); MLflow refuses `:^[]+$` in a metric's name
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "store").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    rows = _fit(tmp_path / "run", 2, MLflow(), probes=[_Answers()])
    _, history = _mlflow_run((tmp_path / "store").as_uri())
    assert [r["valid_regex:^[0-9]+$"] for r in rows if r["kind"] == "epoch"] == [0.25]
    assert history["valid/regex___0-9___"] == [(2, 0.25)]


class _Answers:
    """A probe measuring a metric named as an answer metric is."""

    def measure(self, model, device):
        return ProbeResult({"regex:^[0-9]+$": 0.25})
