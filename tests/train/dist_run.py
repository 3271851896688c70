"""A tiny LoRA run for the distributed tests: under torchrun (2 ranks × batch b) or as one process (batch 2b).

Usage: [torchrun --nproc-per-node 2] python dist_run.py OUT [--batch-size B] [--fsdp] [--dropout P]
                                                          [--resume] [--hold-at-step N]

As one process the loader uses a DistributedSampler of one replica, so it reads the same shuffled order
as the ranks together. After training every rank writes its trainable parameters to OUT/rank<r>.safetensors.
With --hold-at-step N every rank, after logging step N, prints `held rank=R pid=P` and blocks until a signal
ends it: torchrun starts its workers in sessions of their own, so a test kills each by the pid it printed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lorakit as lk
from lorakit.files import safetensors as safetensors_io
from lorakit.train import PlainLog, StepLogged, TrainConfig, Trainer
from lorakit.train.distributed import rank

SEED = 5


def config(fsdp: bool) -> TrainConfig:
    """2 epochs of 12 steps (384 rows, 16 per step, 2 micro-batches per step), checkpoints every 5 steps."""
    return TrainConfig(
        epochs=2,
        lr=3e-3,
        schedule="cosine",
        warmup_steps=3,
        grad_accum=2,
        max_grad_norm=1.0,
        device="cpu",
        seed=SEED,
        log_every=1,
        checkpoint_every=5,
        fsdp=fsdp,
    )


def build(batch_size: int, dropout: float, one_process: bool) -> tuple[nn.Module, DataLoader, DataLoader]:
    """Model and data, seeded: the same on every call and every rank."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(448, 8, generator=g)
    y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    lk.apply_lora(model, lk.LoraConfig(rank=4, alpha=8, dropout=dropout), targets=["0", "4"])  # "2" stays frozen
    data = TensorDataset(x[:384], y[:384])
    if one_process:
        sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=SEED)
        train = DataLoader(data, batch_size=batch_size, sampler=sampler)
    else:
        train = DataLoader(data, batch_size=batch_size, shuffle=True)  # the trainer shards it
    valid = DataLoader(TensorDataset(x[384:], y[384:]), batch_size=32)
    return model, train, valid


def main(argv: list[str] | None = None) -> None:
    """Train (or resume) into OUT, plain logs on rank 0's stdout."""
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--one-process", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--hold-at-step", type=int, default=0)
    args = p.parse_args(argv)
    model, train, valid = build(args.batch_size, args.dropout, args.one_process)

    def hold(event: object) -> None:  # on every rank, after rank 0's PlainLog has printed the step's line
        if isinstance(event, StepLogged) and event.step == args.hold_at_step:
            # one write(2) of the whole line, after this rank's own buffered output: both ranks share torchrun's
            # stdout pipe, and print() writes text and newline apart, so another rank's line could land between
            sys.stdout.flush()
            os.write(sys.stdout.fileno(), f"held rank={rank()} pid={os.getpid()}\n".encode())
            while True:
                signal.pause()

    trainer = Trainer(
        model,
        config(args.fsdp),
        loss_fn=nn.functional.mse_loss,
        callbacks=[PlainLog(), hold],
        metrics={"mae": lambda out, y: (out - y).abs().mean()},
        artifact_dir=args.out,
    )
    trainer.fit(train, valid, resume=args.resume)
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    safetensors_io.write(f"{args.out}/rank{rank()}.safetensors", trainable, {"format": "lorakit-test"})


if __name__ == "__main__":
    main()
