"""`lorakit finetune`'s speed flags (the job's `speed` settings, hf/speed.py): the loss, fused blocks, compile."""

from __future__ import annotations

import argparse

from ..hf.speed import LOSSES, SWITCHES, SpeedConfig


def add_args(p: argparse.ArgumentParser) -> None:
    """The "speed" group: --loss, --fuse, --compile (each "auto" by default: what was measured to pay)."""
    g = p.add_argument_group("speed (docs/finetuning.md#speed)")
    g.add_argument(
        "--loss",
        choices=LOSSES,
        default="auto",
        help="causal-lm: chunked cross-entropy (never the full logits) or the model's plain loss (default auto)",
    )
    g.add_argument(
        "--fuse",
        choices=SWITCHES,
        default="auto",
        help="fused RMSNorm/SwiGLU blocks in eager training (default auto)",
    )
    g.add_argument(
        "--compile",
        choices=SWITCHES,
        default="auto",
        help="torch.compile each decoder block once, reused by every layer (default auto: on for CPU runs whose "
        "--max-steps reaches the measured break-even, see docs/finetuning.md)",
    )


def config(args: argparse.Namespace) -> SpeedConfig:
    """The job's SpeedConfig from the flags."""
    return SpeedConfig(loss=args.loss, fuse=args.fuse, compile=args.compile)
