"""`lorakit bench`: run benchmarks/run.py of a source checkout (the benchmarks are not installed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import positive_int

BENCH_SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "run.py"  # src/lorakit/cli/ -> checkout root


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
