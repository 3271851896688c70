"""1 -> 2 processes on CPU: training step time and peak memory per rank, under real torchrun (gloo).

    python benchmarks/distributed.py [--repeats 3] [--steps 40] [--dim 1024] [--layers 8] [--batch 32]

Each configuration (1 process; 2 ranks with DDP; 2 ranks with FSDP2) runs as its own fresh launch, the
configurations interleaved round-robin `--repeats` times so machine drift hits all of them alike. A run
trains a LoRA-wrapped MLP stack (frozen base, r=8 on every layer) through `lorakit.train.Trainer` with a
fixed batch per rank (so 2 ranks process twice the samples per step), one CPU thread per process, and
reports the median step time after warm-up and each rank's peak RSS. Prints a markdown table of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [("1 process", 1, False), ("2 ranks, DDP", 2, False), ("2 ranks, FSDP2", 2, True)]
WARMUP = 5


def worker(args: argparse.Namespace) -> None:
    """One rank: train, then write {"step_s": [...], "rss_mib": ...} to OUT/rank<r>.json."""
    import resource

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import lorakit as lk
    from lorakit.train import StepLogged, TrainConfig, Trainer
    from lorakit.train.distributed import rank

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = [m for _ in range(args.layers) for m in (nn.Linear(args.dim, args.dim), nn.GELU())]
    model = nn.Sequential(*layers, nn.Linear(args.dim, 1))
    lk.apply_lora(model, lk.LoraConfig(rank=8, alpha=16), targets=["all-linear"])
    n = args.batch * args.steps * 2  # enough rows for `steps` steps at 2 ranks
    x = torch.randn(n, args.dim)
    data = DataLoader(TensorDataset(x, x[:, :1].sin()), batch_size=args.batch, shuffle=True)
    stamps: list[float] = []

    def clock(event: object) -> None:
        if isinstance(event, StepLogged):
            stamps.append(time.perf_counter())

    cfg = TrainConfig(epochs=1, lr=1e-3, device="cpu", log_every=1, fsdp=args.fsdp)
    Trainer(model, cfg, loss_fn=nn.functional.mse_loss, callbacks=[clock]).fit(data)
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][WARMUP : args.steps]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out, f"rank{rank()}.json").write_text(json.dumps({"step_s": steps, "rss_mib": rss}))


def launch(name: str, world: int, fsdp: bool, args: argparse.Namespace) -> dict:
    """One fresh run of a configuration: the median step time and the largest peak RSS over its ranks."""
    with tempfile.TemporaryDirectory() as out:
        flags = [
            "--worker",
            "--out",
            out,
            "--steps",
            str(args.steps),
            "--dim",
            str(args.dim),
            "--layers",
            str(args.layers),
            "--batch",
            str(args.batch),
            *(["--fsdp"] if fsdp else []),
        ]
        prefix = (
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
            if world > 1
            else [sys.executable]
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(
            [*prefix, __file__, *flags], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    assert len(ranks) == world, f"{name}: {len(ranks)} rank reports"
    return {"step_ms": 1000 * statistics.median(ranks[0]["step_s"]), "rss_mib": max(r["rss_mib"] for r in ranks)}


def main() -> None:
    """Interleave the configurations, print the markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=32, help="rows per rank per step")
    p.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in CONFIGS}
    for _ in range(args.repeats):
        for name, world, fsdp in CONFIGS:
            runs[name].append(launch(name, world, fsdp, args))
    base = statistics.median(r["step_ms"] for r in runs[CONFIGS[0][0]])
    print(
        f"LoRA r=8 on a {args.layers}×Linear({args.dim}, {args.dim}) MLP, fp32, CPU, 1 thread per process, "
        f"{args.batch} rows per rank per step; medians of {args.repeats} interleaved launches "
        f"(each the median of {args.steps - WARMUP - 1} steps)\n"
    )
    print("| configuration | rows/step | step time (ms) | rows/s | vs 1 process | peak RSS per rank (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, world, _ in CONFIGS:
        ms = statistics.median(r["step_ms"] for r in runs[name])
        rss = statistics.median(r["rss_mib"] for r in runs[name])
        rows = args.batch * world
        speed = base * world / ms
        print(f"| {name} | {rows} | {ms:.1f} | {1000 * rows / ms:,.0f} | {speed:.2f}× rows/s | {rss:.0f} |")


if __name__ == "__main__":
    main()
