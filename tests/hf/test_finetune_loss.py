"""`finetune`'s loss setting (hf/speed.py → hf/causal_loss.py): a causal-lm job trained with loss="chunked" logs
the losses loss="plain" logs (to 1e-5), and says which loss it resolved to."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
transformers = pytest.importorskip("transformers")

import _hf_models  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.hf import finetune  # noqa: E402
from lorakit.hf.speed import SpeedConfig  # noqa: E402
from lorakit.train import TrainConfig  # noqa: E402

transformers.utils.logging.set_verbosity_error()


@pytest.mark.slow
def test_a_chunked_loss_run_trains_to_the_plain_runs_losses(tmp_path):
    qa = [{"prompt": "question : what is two plus two ? answer :", "completion": "four"}] * 4
    rows = qa + [{"text": s} for s in _hf_models.SENTENCES] * 2  # prompt-masked rows and plain text, padded
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    model_dir = _hf_models.save_tiny("llama", tmp_path / "llama")
    losses = {}
    for loss in ("plain", "chunked"):
        job = finetune.FinetuneJob(
            model=model_dir, data=tmp_path / "train.jsonl", task="causal-lm", out=tmp_path / loss,
            lora=lk.LoraConfig(rank=4, alpha=8.0), batch_size=4, max_length=32, speed=SpeedConfig(loss=loss),
            train=TrainConfig(epochs=1, max_steps=4, log_every=1, lr=1e-2, device="cpu"),
        )  # fmt: skip
        setup = finetune.prepare(job)
        assert setup.speed.loss == loss
        report = finetune.run(setup, callbacks=[])
        assert report["speed"]["loss"] == loss
        lines = (tmp_path / loss / "run" / "metrics.jsonl").read_text().splitlines()
        losses[loss] = [(r.get("step"), k, v) for r in map(json.loads, lines) for k, v in r.items() if "loss" in k]
    assert len(losses["plain"]) >= 4 and [x[:2] for x in losses["chunked"]] == [x[:2] for x in losses["plain"]]
    for (_, key, got), (_, _, want) in zip(losses["chunked"], losses["plain"], strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5), key
