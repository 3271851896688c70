"""`lorakit example`: the end-to-end MLP example (examples/mlp_example.py); `lorakit example chat`: the LLM one
(examples/chat_example.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import positive_int, quiet_transformers


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


def example_chat(args: argparse.Namespace) -> int:
    """Run `lorakit example chat`; its exit status is 1 when any of its checks fails, 2 when it cannot start."""
    from ..examples.chat_example import ChatExampleOptions, missing_packages, run

    if not missing_packages():  # (run() names what is missing and how to install it)
        quiet_transformers()
    return run(ChatExampleOptions(out=args.out, seed=args.seed))


def _add_chat(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Flags of `lorakit example chat`."""
    p = sub.add_parser(
        "chat",
        help="the LLM example: fine-tune two chat adapters, score them, serve both, export one to GGUF",
        description="The end-to-end LLM example, on a tiny chat model built on the spot (nothing downloaded): "
        "pre-train its base skill, LoRA fine-tune two adapters on two checkable tasks with the live dashboard, "
        "show exact-match accuracy of the base and each adapter on held-out prompts, serve both adapters from "
        "one `lorakit serve` and ask them through the openai client, export one to GGUF and ask llama.cpp "
        "(skipped when llama-cpp-python is not installed); exits non-zero if any check fails.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("artifacts/example-chat"),
        help="where the model, data, adapters and GGUF go: new, empty, or an earlier run's (default: "
        "artifacts/example-chat)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and shuffling (default: 0)")
    p.set_defaults(run=example_chat)


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
    _add_chat(p.add_subparsers(title="other examples", metavar="chat", required=False))
