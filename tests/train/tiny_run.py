"""A tiny LoRA training run, used as a real subprocess by the trainer tests (resume, plain logs).

Usage: python tiny_run.py ARTIFACT_DIR [--resume] [--hold-at-step N]

With --hold-at-step N the run prints step N's log line and then blocks until a signal ends it, so a test
that kills it on reading that line knows exactly where the run stood.
"""

from __future__ import annotations

import argparse
import signal

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lorakit as lk
from lorakit.train import PlainLog, StepLogged, TrainConfig, Trainer

CONFIG = TrainConfig(
    epochs=3,
    lr=3e-3,
    schedule="cosine",
    warmup_steps=4,
    grad_accum=2,
    max_grad_norm=1.0,
    device="cpu",
    seed=7,
    log_every=1,
    checkpoint_every=3,
)


def build() -> tuple[nn.Module, DataLoader, DataLoader]:
    """Model and data, seeded: the same on every call."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    lk.apply_lora(model, lk.LoraConfig(rank=4, alpha=8, dropout=0.1), targets=["0", "2"])
    train = DataLoader(TensorDataset(x[:384], y[:384]), batch_size=16, shuffle=True)
    valid = DataLoader(TensorDataset(x[384:], y[384:]), batch_size=64)
    return model, train, valid


def main(argv: list[str] | None = None) -> None:
    """Train (or resume) into the artifact dir, logging plain lines to stdout."""
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--hold-at-step", type=int, default=0)
    args = parser.parse_args(argv)
    model, train, valid = build()

    def hold(event: object) -> None:  # after PlainLog has printed the step's line
        if isinstance(event, StepLogged) and event.step == args.hold_at_step:
            while True:
                signal.pause()

    trainer = Trainer(
        model,
        CONFIG,
        loss_fn=nn.functional.mse_loss,
        callbacks=[PlainLog(), hold],
        metrics={"mae": lambda out, y: (out - y).abs().mean()},
        artifact_dir=args.artifact_dir,
    )
    trainer.fit(train, valid, resume=args.resume)


if __name__ == "__main__":
    main()
