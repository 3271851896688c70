"""Resume: a run SIGKILLed mid-epoch, resumed, ends with the same bytes as an uninterrupted run (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

SCRIPT = Path(__file__).with_name("tiny_run.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
VOLATILE = {"elapsed_s", "throughput"}  # wall-clock figures differ between any two runs


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *extra],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
        check=True,
    )


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _tiny_run():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import tiny_run
    finally:
        sys.path.pop(0)
    return tiny_run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    _tiny_run().main([str(out)])  # in this process: the same code, one interpreter start fewer
    return out


def test_resume_after_sigkill_mid_epoch_matches_uninterrupted(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    # the child holds still after logging step 17, two steps past the checkpoint at 15: epoch 2 of 3, mid-epoch
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), "--hold-at-step", "17"], stdout=subprocess.PIPE, text=True, env=ENV
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step ") and "step=17/" in line:
            proc.send_signal(signal.SIGKILL)
            break
    seen += proc.stdout.readlines()
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert "step=17/" in seen[-1]  # nothing after the line it held at
    assert any(line.startswith("checkpoint step=15 ") for line in seen)
    assert not (out / "adapter").exists()
    assert any(r["step"] == 17 for r in _rows(out))  # rows past the checkpoint, which resume must drop

    resumed = _run(out, "--resume")
    first = resumed.stdout.splitlines()[0]
    assert first.startswith("start ") and "resumed_at_step=15" in first, first
    for name in (
        "adapter/adapter_model.safetensors",
        "best_adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
    ):
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert _rows(out) == _rows(uninterrupted)


def test_resume_refuses_a_different_config(uninterrupted: Path, tmp_path: Path) -> None:
    from torch import nn

    from lorakit.train import TrainConfig, Trainer

    tiny = _tiny_run()
    model, train, valid = tiny.build()
    changed = TrainConfig(**{**tiny.CONFIG.to_dict(), "betas": tiny.CONFIG.betas, "lr": 1e-2})
    trainer = Trainer(model, changed, loss_fn=nn.functional.mse_loss, callbacks=[], artifact_dir=uninterrupted)
    with pytest.raises(ValueError, match="'lr': \\(0.003, 0.01\\)"):
        trainer.fit(train, valid, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(model, tiny.CONFIG, loss_fn=nn.functional.mse_loss, callbacks=[], artifact_dir=tmp_path).fit(
            train, resume=True
        )


class _Crash(Exception):
    pass


def test_resume_from_an_epoch_end_checkpoint_matches_uninterrupted(uninterrupted: Path, tmp_path: Path) -> None:
    from torch import nn

    from lorakit.train import CheckpointSaved, Trainer

    tiny = _tiny_run()

    def crash_after_epoch_2(event: object) -> None:
        if isinstance(event, CheckpointSaved) and event.step == 24:  # 12 steps per epoch
            raise _Crash

    model, train, valid = tiny.build()
    with pytest.raises(_Crash):
        Trainer(
            model,
            tiny.CONFIG,
            loss_fn=nn.functional.mse_loss,
            callbacks=[crash_after_epoch_2],
            metrics={"mae": lambda out, y: (out - y).abs().mean()},
            artifact_dir=tmp_path,
        ).fit(train, valid)
    model, train, valid = tiny.build()
    Trainer(
        model,
        tiny.CONFIG,
        loss_fn=nn.functional.mse_loss,
        callbacks=[],
        metrics={"mae": lambda out, y: (out - y).abs().mean()},
        artifact_dir=tmp_path,
    ).fit(train, valid, resume=True)
    assert (tmp_path / "adapter/adapter_model.safetensors").read_bytes() == (
        uninterrupted / "adapter/adapter_model.safetensors"
    ).read_bytes()
    assert _rows(tmp_path) == _rows(uninterrupted)


def test_artifacts_are_safetensors_json_and_png_only(uninterrupted: Path) -> None:
    from lorakit.files import safetensors as safetensors_io

    suffixes = {p.suffix for p in uninterrupted.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".jsonl", ".png", ".safetensors"}, suffixes
    tensors, meta = safetensors_io.read(uninterrupted / "checkpoint.safetensors")
    assert meta["format"] == "lorakit-train-checkpoint"
    assert {k.split(".")[0] for k in tensors} == {"param", "optim", "rng"}
    assert all("lora_" in k for k in tensors if k.startswith("param."))  # adapter only: nothing of the base
