"""Compiled blocks (lorakit.train.compile) against eager: compile time, step speed-up, break-even steps.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compiled.py [--rounds 9] [--dropout 0.0] [--out PATH]

A Llama (hidden 512, intermediate 1376, 4 layers, vocab 4096), LoRA r8 on all seven projections, batches of
4 × 256 tokens, one thread. Two copies of the same model: one eager, one with its decoder layers compiled by
inductor (`compile_blocks`). The compiled copy's first steps are timed alone (they compile: forward graphs at
the first forward, backward graphs at the first backward); then whole training steps (forward, backward,
AdamW) run interleaved, eager and compiled in turn, and the ratio is the median of same-round ratios.
Break-even: the steps after which the compile time is paid back, compile_s / (eager step - compiled step).
A recompile check then feeds lengths 200..256 padded to COMPILE_PAD_MULTIPLE and counts graphs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from lorakit.train.compile import COMPILE_PAD_MULTIPLE, compile_blocks
from lorakit.train.schedule import adamw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from run import build_base, build_lorakit  # noqa: E402
from run import parse_args as run_args  # noqa: E402


def model(dropout: float) -> LlamaForCausalLM:
    """The suites' benchmark Llama (run.py's defaults) with LoRA r8 on every projection, in train mode."""
    a = run_args([])
    return build_lorakit(a, build_base(a), dropout).train()


def stepper(net: LlamaForCausalLM, ids: torch.Tensor):
    """One training step of `net` on `ids` (forward, backward, AdamW), as a closure."""
    opt = adamw([{"params": [p for p in net.parameters() if p.requires_grad]}], 1e-4, (0.9, 0.999), 0.0)

    def step() -> None:
        net(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "RESULTS-compiled.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    ids = torch.randint(0, 4096, (4, 256), generator=torch.Generator().manual_seed(0))
    eager, compiled_net = model(args.dropout), model(args.dropout)
    compiled = compile_blocks(compiled_net)
    step_e, step_c = stepper(eager, ids), stepper(compiled_net, ids)
    t = time.perf_counter()
    step_c()
    first_s = time.perf_counter() - t
    compile_s = compiled.compile_s
    samples = harness.interleaved({"eager": step_e, "compiled": step_c}, args.rounds, 1, "cpu")
    e, c = samples.median("eager"), samples.median("compiled")
    ratio = samples.ratio("compiled", "eager")
    gain = e - c
    breakeven = compile_s / gain if gain > 0 else float("inf")
    graphs0 = compiled.graphs
    lengths = list(range(200, 257, 7))
    for n in lengths:
        padded = -(-n // COMPILE_PAD_MULTIPLE) * COMPILE_PAD_MULTIPLE
        stepper(compiled_net, torch.randint(0, 4096, (4, padded)))()
    distinct = len({-(-n // COMPILE_PAD_MULTIPLE) for n in lengths})
    lines = [
        "# Compiled blocks (regional torch.compile) against eager",
        "",
        f"`OMP_NUM_THREADS=1 python benchmarks/compiled.py --rounds {args.rounds} --dropout {args.dropout}`",
        "",
        f"Machine: {harness.machine('cpu', 1)}; load average {harness.loadavg()} (shared with other jobs).",
        "",
        "Llama hidden 512 / intermediate 1376 / 4 layers / vocab 4096, LoRA r8 on q/k/v/o/gate/up/down, "
        f"dropout {args.dropout}, batch 4 × 256 tokens, training steps (forward, backward, AdamW), inductor.",
        "",
        "| | value |",
        "| --- | --- |",
        f"| eager step (median of {args.rounds}) | {harness.fmt_time(e)} ± {samples.spread('eager'):.0%} |",
        f"| compiled step (median of {args.rounds}) | {harness.fmt_time(c)} ± {samples.spread('compiled'):.0%} |",
        f"| compiled / eager (median of same-round ratios) | {ratio:.3f}× |",
        f"| compile time (dynamo records, forward + backward graphs) | {compile_s:.1f} s |",
        f"| first compiled step (compiling included) | {first_s:.1f} s |",
        f"| break-even (compile time / time saved per step) | {breakeven:,.0f} steps |",
        f"| graphs for {len(lengths)} lengths {lengths[0]}..{lengths[-1]} padded to ×{COMPILE_PAD_MULTIPLE} "
        f"({distinct} distinct) | {compiled.graphs - graphs0} more (recompiles so far: {compiled.recompiles}) |",
        "",
        "Compiled blocks alone, against eager without lorakit's fused blocks. `finetune --compile auto` stays "
        "eager: end to end, with the fused blocks that auto turns on, compiling did not pay "
        "(benchmarks/RESULTS-e2e.md; lorakit/hf/speed.py). Timings stretch under load; the ratio is the figure "
        "to carry to another machine. Graph counts are dynamo's (process-wide).",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    print("step times eager", [round(x, 3) for x in samples.times["eager"]], statistics.median(samples.times["eager"]))


if __name__ == "__main__":
    main()
