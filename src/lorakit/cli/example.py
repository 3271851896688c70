"""`lorakit example`: the end-to-end MLP example (examples/mlp_example.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import positive_int


def example(args: argparse.Namespace) -> int:
    """Run `lorakit example`; its exit status is 1 when any of its checks fails."""
    from ..examples.mlp_example import ExampleOptions, run

    return run(
        ExampleOptions(
            epochs=args.epochs,
            rank=args.rank,
            alpha=args.alpha,
            device=args.device,
            artifact_dir=args.artifact_dir,
            seed=args.seed,
            check_only=args.check_only,
            resume=args.resume,
        )
    )


def add_example(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Flags of `lorakit example`."""
    p = sub.add_parser(
        "example",
        help="pre-train an MLP, fine-tune it with LoRA, save, reload, merge, check",
        description="The end-to-end LoRA example: pre-train SimpleMlp on task A, LoRA fine-tune on "
        "task B with the live dashboard, save the adapter, reload it into a fresh base, "
        "merge; exits non-zero if any check fails.",
    )
    p.add_argument("--epochs", type=positive_int, default=12, help="fine-tuning epochs (default: 12)")
    p.add_argument("--rank", type=positive_int, default=4, help="LoRA rank r (default: 4)")
    p.add_argument("--alpha", type=float, default=8.0, help="LoRA alpha; scaling = alpha / rank (default: 8)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu, deterministic)")
    p.add_argument(
        "--artifact-dir",
        type=Path,
        default=Path("artifacts/example"),
        help="where weights, adapter, metrics and plots go (default: artifacts/example)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and shuffling (default: 0)")
    p.add_argument(
        "--check-only",
        action="store_true",
        help="only rerun the reload and merge checks on a finished run's --artifact-dir",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run in --artifact-dir from its last checkpoint (same flags)",
    )
    p.set_defaults(run=example)
