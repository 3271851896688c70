"""`lorakit example` (the MLP example, examples/mlp_example.py) and `lorakit bench` (benchmarks/run.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import positive_int

BENCH_SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "run.py"  # src/lorakit/cli/ -> checkout root


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


def bench(args: argparse.Namespace) -> int:
    """Run `lorakit bench` (needs a source checkout: the benchmarks are not installed)."""
    import importlib.util

    script = BENCH_SCRIPT
    if not script.is_file():
        raise OSError(f"{script}: not found; `lorakit bench` needs a source checkout of lorakit")
    spec = importlib.util.spec_from_file_location("lorakit_benchmarks_run", script)
    if spec is None or spec.loader is None:
        raise OSError(f"{script}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    argv = [f"--threads={args.threads}", f"--device={args.device}", f"--rank={args.rank}"]
    argv += ["--quick"] if args.quick else []
    argv += [f"--out={args.out}"] if args.out else []
    print(f"wrote {module.main(argv)}")
    return 0


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


def add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Flags of `lorakit bench` (passed on to benchmarks/run.py)."""
    p = sub.add_parser(
        "bench",
        help="benchmark lorakit against PEFT and the cost floor",
        description="Runs benchmarks/run.py of a source checkout: lorakit vs PEFT vs the frozen "
        "bound on a Llama-style model; writes benchmarks/RESULTS.md (or --out).",
    )
    p.add_argument("--quick", action="store_true", help="a tiny model, a few seconds (numbers not meaningful)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--rank", type=positive_int, default=8, help="LoRA rank (default: 8)")
    p.add_argument("--out", type=Path, help="report path (default: benchmarks/RESULTS.md)")
    p.set_defaults(run=bench)
