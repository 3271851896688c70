"""The `lorakit` command: one short function per subcommand, each building options and calling the library.

Adding a subcommand is adding two functions: `add_<name>(subparsers)` declaring its flags with
`set_defaults(run=<name>)`, and `<name>(args) -> int` doing the work; then list `add_<name>` in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


# -- lorakit example ---------------------------------------------------------------------------------

def add_example(sub: argparse._SubParsersAction) -> None:
    """Flags of `lorakit example`."""
    p = sub.add_parser("example", help="pre-train an MLP, fine-tune it with LoRA, save, reload, merge, check",
                       description="The end-to-end LoRA example: pre-train SimpleMlp on task A, LoRA fine-tune on "
                                   "task B with the live dashboard, save the adapter, reload it into a fresh base, "
                                   "merge; exits non-zero if any check fails.")
    p.add_argument("--epochs", type=_positive_int, default=12, help="fine-tuning epochs (default: 12)")
    p.add_argument("--rank", type=_positive_int, default=4, help="LoRA rank r (default: 4)")
    p.add_argument("--alpha", type=float, default=8.0, help="LoRA alpha; scaling = alpha / rank (default: 8)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu, deterministic)")
    p.add_argument("--artifact-dir", type=Path, default=Path("artifacts/example"),
                   help="where weights, adapter, metrics and plots go (default: artifacts/example)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and shuffling (default: 0)")
    p.add_argument("--check-only", action="store_true",
                   help="only rerun the reload and merge checks on a finished run's --artifact-dir")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run in --artifact-dir from its last checkpoint (same flags)")
    p.set_defaults(run=example)


def example(args: argparse.Namespace) -> int:
    """Run `lorakit example`."""
    from ..examples.mlp_example import ExampleOptions, run

    return run(ExampleOptions(epochs=args.epochs, rank=args.rank, alpha=args.alpha, device=args.device,
                              artifact_dir=args.artifact_dir, seed=args.seed, check_only=args.check_only,
                              resume=args.resume))


# -- lorakit bench -----------------------------------------------------------------------------------

def add_bench(sub: argparse._SubParsersAction) -> None:
    """Flags of `lorakit bench` (passed on to benchmarks/run.py)."""
    p = sub.add_parser("bench", help="benchmark lorakit against PEFT and the cost floor",
                       description="Runs benchmarks/run.py of a source checkout: lorakit vs PEFT vs the frozen "
                                   "bound on a Llama-style model; writes benchmarks/RESULTS.md (or --out).")
    p.add_argument("--quick", action="store_true", help="a tiny model, a few seconds (numbers not meaningful)")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank (default: 8)")
    p.add_argument("--out", type=Path, help="report path (default: benchmarks/RESULTS.md)")
    p.set_defaults(run=bench)


def bench(args: argparse.Namespace) -> int:
    """Run `lorakit bench`."""
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"
    if not script.is_file():
        raise OSError(f"{script}: not found; `lorakit bench` needs a source checkout of lorakit")
    spec = importlib.util.spec_from_file_location("lorakit_benchmarks_run", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    argv = [f"--threads={args.threads}", f"--device={args.device}", f"--rank={args.rank}"]
    argv += ["--quick"] if args.quick else []
    argv += [f"--out={args.out}"] if args.out else []
    print(f"wrote {module.main(argv)}")
    return 0


# -- the command -------------------------------------------------------------------------------------

from .hf_commands import ADDERS as HF_SUBCOMMANDS  # finetune, merge, inspect, generate (Hugging Face models)

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_example, *HF_SUBCOMMANDS, add_bench]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `lorakit` argument parser with every subcommand in SUBCOMMANDS."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA for PyTorch: train, save, load and merge "
                                     "low-rank adapters. Start with `lorakit example`.")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND", title="commands")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lorakit` console script and `python -m lorakit`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # user errors (bad device, unreadable file, ...): one line, no traceback
        print(f"lorakit {args.run.__name__}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
