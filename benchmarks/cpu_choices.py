"""Each CPU-specific choice of the LoRA linear's fast path, both ways, side by side on this CPU.

    .venv/bin/python benchmarks/cpu_choices.py [--quick] [--rounds 5] [--out benchmarks/RESULTS-cpu-choices.md]

The choices are `lorakit.ops.GemmPlan`'s: the orientation of the rank-r GEMMs ("wide": h = (A xᵀ)ᵀ,
dh = (Bᵀ gyᵀ)ᵀ, dB = (hᵀ gy)ᵀ; "narrow": x Aᵀ, gy B, gyᵀ h) and when to fold s·B A into the weight. Each pair
is timed with torch.utils.benchmark, interleaved round by round in one process; ratios are medians of
same-round ratios (other load on a shared machine moves both sides of a round alike).
"""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils.benchmark as tb

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from lorakit import ops  # noqa: E402
from lorakit.ops_linear import _fold_backward, _fold_pays  # noqa: E402

OUT = Path(__file__).resolve().parent / "RESULTS-cpu-choices.md"
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timer(fn: Callable[[], object]) -> tb.Timer:
    """A torch.utils.benchmark timer on this process's CPU time with one torch thread (other load on a shared
    machine perturbs it far less than wall time), on wall time with more (CPU time would count both threads)."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    return tb.Timer("fn()", globals={"fn": fn}, timer=clock)


def paired(fns: dict[str, Callable[[], object]], rounds: int, budget: float) -> dict[str, list[float]]:
    """Per-round seconds per call of each function, interleaved: every round times each once, in turn."""
    warm = [timer(f).timeit(1).mean for f in fns.values()]  # also a warm-up
    number = max(1, int(budget / max(min(warm), 1e-7)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            times[k].append(timer(f).timeit(number).mean)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def rank_r_products(n: int, d: int, r: int, dtype: torch.dtype) -> dict[str, dict[str, Callable[[], object]]]:
    """h = x Aᵀ, dh = gy B and dB = gyᵀ h (d_in = d_out = d), each as the wide and the narrow call."""
    g = torch.Generator().manual_seed(0)
    x, gy = torch.randn(n, d, generator=g).to(dtype), torch.randn(n, d, generator=g).to(dtype)
    A, B = torch.randn(r, d, generator=g).to(dtype), torch.randn(d, r, generator=g).to(dtype)
    h = torch.randn(r, n, generator=g).to(dtype).t()  # as the wide forward leaves it
    return {
        "h": {"wide": lambda: (A @ x.t()).t(), "narrow": lambda: x @ A.t()},
        "dh": {"wide": lambda: (B.t() @ gy.t()).t(), "narrow": lambda: gy @ B},
        "dB": {"wide": lambda: (h.t() @ gy).t(), "narrow": lambda: gy.t() @ h},
    }


def layer_step(n: int, d_in: int, d_out: int, r: int, dtype: torch.dtype, plan: ops.GemmPlan, train: bool = True):
    """One LoRA linear's forward and backward (dx, dA, dB; frozen W), or its no-grad forward, under `plan`."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d_in, generator=g).to(dtype).requires_grad_(train)
    W, b = torch.randn(d_out, d_in, generator=g).to(dtype) / d_in**0.5, torch.zeros(d_out, dtype=dtype)
    A = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(dtype).requires_grad_(train)
    B = (torch.randn(d_out, r, generator=g) / r).to(dtype).requires_grad_(train)
    gy = torch.randn(n, d_out, generator=g).to(dtype)

    def step() -> None:
        if not train:
            with torch.no_grad():
                ops.lora_linear(x, W, b, A, B, 2.0, plan=plan)
            return
        y = ops.lora_linear(x, W, b, A, B, 2.0, plan=plan)
        torch.autograd.grad(y, (x, A, B), gy)

    return step


def machine_lines(threads: list[int]) -> list[str]:
    cfg = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", cfg)
    mkl = re.search(r"Math Kernel Library Version ([\w.]+)", cfg)
    dnn = re.search(r"MKL-DNN (v[\d.]+)", cfg)
    return [
        f"Machine: {harness.machine('cpu', threads[0])}; torch threads measured: {threads}.",
        f"ISA: torch.backends.cpu.get_cpu_capability() = {torch.backends.cpu.get_cpu_capability()}; "
        f"BLAS {blas.group(1) if blas else '?'} {mkl.group(1) if mkl else ''}, oneDNN {dnn.group(1) if dnn else '?'}.",
        f"The code's plan: `lorakit.ops.gemm_plan()` = `{ops.gemm_plan()}` (the same on every CPU).",
    ]


def orientation_section(a, threads: list[int]) -> list[str]:
    """The rank-r products alone, wide vs narrow, over the grid."""
    ns, ds, rs = ([256], [512], [8]) if a.quick else ([64, 256, 1024, 4096], [512, 1376, 2048, 4096], [8, 16, 64])
    rows, summary = [], {}
    for th, dt, n, d, r in itertools.product(threads, a.dtypes, ns, ds, rs):
        if dt == "bf16" and n * d * r > 1024 * 1376 * 16:  # bf16 GEMMs take a slow kernel on AVX2: keep it short
            continue
        torch.set_num_threads(th)
        cells = []
        for name, fns in rank_r_products(n, d, r, DT[dt]).items():
            t = paired(fns, a.rounds, a.budget)
            q = ratio(t, "narrow", "wide")
            summary.setdefault((th, dt, r, name), []).append(q)
            cells.append(f"{harness.fmt_time(statistics.median(t['wide']))} / {q:.2f}×")
        rows.append([str(th), dt, str(n), str(d), str(r), *cells])
        print(*rows[-1], flush=True)
    head = ["threads", "dtype", "N", "d", "r", *(f"{k}: wide / narrow÷wide" for k in ("h", "dh", "dB"))]
    agg = [
        [str(th), dt, str(r), name, f"{min(v):.2f}×", f"{statistics.median(v):.2f}×", f"{max(v):.2f}×"]
        for (th, dt, r, name), v in sorted(summary.items())
    ]
    return [
        "## Rank-r GEMM orientation, each product alone",
        "",
        "`narrow÷wide` > 1: the wide orientation (the code's) is faster. Per (threads, dtype, r, product), over the "
        "N and d of the grid:",
        "",
        harness.table(["threads", "dtype", "r", "product", "min", "median", "max"], agg),
        "",
        "<details><summary>every shape (wide's time per call / narrow÷wide)</summary>",
        "",
        harness.table(head, rows),
        "",
        "</details>",
        "",
    ]


def layer_section(a, threads: list[int]) -> list[str]:
    """The whole layer's forward + backward, plan wide vs narrow (fold: auto)."""
    shapes = [(512, 1376)] if a.quick else [(512, 512), (512, 1376), (1376, 512), (2048, 2048), (4096, 4096)]
    ns, rs = ([256], [8]) if a.quick else ([64, 256, 1024, 4096], [8, 64])
    rows = []
    for th, dt, (d_in, d_out), n, r in itertools.product(threads, a.dtypes, shapes, ns, rs):
        if n * d_in * d_out > 1024 * 2048 * 2048 or (dt == "bf16" and n * d_in * d_out > 256 * 512 * 1376):
            continue  # keeps the run short (bf16 GEMMs take a slow kernel on AVX2)
        torch.set_num_threads(th)
        fns = {p: layer_step(n, d_in, d_out, r, DT[dt], ops.GemmPlan(rank_r=p)) for p in ("wide", "narrow")}
        t = paired(fns, a.rounds, a.budget)
        rows.append(
            [str(th), dt, f"{d_in}→{d_out}", str(n), str(r), harness.fmt_time(statistics.median(t["wide"])),
             harness.fmt_time(statistics.median(t["narrow"])), f"{ratio(t, 'narrow', 'wide'):.3f}×"]
        )  # fmt: skip
        print(*rows[-1], flush=True)
    head = ["threads", "dtype", "d_in→d_out", "N", "r", "wide (code)", "narrow", "narrow÷wide"]
    return [
        "## Rank-r orientation in the whole layer (forward + dx, dA, dB; fold as the code decides)",
        "",
        harness.table(head, rows),
        "",
    ]


def fold_section(a, threads: list[int]) -> list[str]:
    """Fold never vs always (fp32, no dropout), training step and no-grad forward, across N around the rule's edge."""
    shapes = [(512, 1376)] if a.quick else [(512, 512), (512, 1376), (1376, 512), (2048, 2048)]
    fracs = [2.0] if a.quick else [0.125, 0.25, 0.5, 1.0, 2.0, 4.0]
    rows = []
    for th, (d_in, d_out), f, train in itertools.product(threads, shapes, fracs, (True, False)):
        n = int(f * d_in)
        torch.set_num_threads(th)
        plans = {m: ops.GemmPlan(fold=m) for m in ("never", "always")}
        fns = {m: layer_step(n, d_in, d_out, 8, torch.float32, plan, train) for m, plan in plans.items()}
        t = paired(fns, a.rounds, a.budget)
        q = ratio(t, "always", "never")
        if train:
            fwd = _fold_pays(n * d_out, d_in, d_out, torch.float32)
            bwd = _fold_backward(n, d_in, d_out, torch.float32, True)
            picks = f"fwd {'fold' if fwd else 'no'}, bwd {'fold' if bwd else 'no'}"
        else:
            picks = "fold" if _fold_pays(n * (d_in + d_out), d_in, d_out, torch.float32) else "no"
        best = "fold" if q < 1 else "no fold"
        rows.append(
            [str(th), "train" if train else "no-grad", f"{d_in}→{d_out}", str(n), f"{n / d_in:g}",
             harness.fmt_time(statistics.median(t["never"])), f"{q:.3f}×", best, picks]
        )  # fmt: skip
        print(*rows[-1], flush=True)
    head = ["threads", "mode", "d_in→d_out", "N", "N/d_in", "never", "always÷never", "faster here", "code (auto) picks"]
    return [
        "## Folding s·B A into the weight (fp32, r = 8, no dropout)",
        "",
        '`always÷never` < 1: folding is faster. The rule (`GemmPlan.fold = "auto"`): the forward folds when '
        "N·d_out > d_in·d_out (N > d_in; without grad N·(d_in + d_out) > d_in·d_out), the input gradient when "
        "N·d_in > d_in·d_out (N > d_out). In training the forward and backward decide apart, so one row can be "
        "half folded; `always`/`never` force both.",
        "",
        harness.table(head, rows),
        "",
    ]


# What one machine cannot show, written under every run's tables (the argument is docs/architecture.md's)
NOT_MEASURED = [
    "## Not measured here: Intel (AVX-512), and what the rule predicts there",
    "",
    "This page measures one CPU. The plan is not tuned to it: `gemm_plan()` is the same rule on every CPU and is "
    "never a timing (a timing could differ in a resumed process and change the rounding). What the rule rests on, "
    "for a CPU with AVX-512: GEMM kernels spread the output's contiguous dimension over their SIMD lanes (MKL's "
    "and OpenBLAS's micro-kernels along M of a column-major C; oneDNN's brgemm along N of a row-major one), and "
    'AVX-512 has 16 fp32 lanes where AVX2 has 8. "wide" puts tokens or d there, which fill any register; '
    '"narrow" puts r there, which leaves half of each 16-lane register idle at r = 8 (OpenBLAS had to add '
    'AVX-512 kernels for small M, OpenMathLib/OpenBLAS#3196). So the case where "wide" wins here is not one '
    'that AVX-512 turns around; at r ≥ 16 "narrow" is up to ~15% ahead here on h and dh alone, a few percent of '
    "a layer (and in bf16, torch's AVX2 fallback kernel, ~6% of the layer at r = 64). "
    "Two things differ on Intel and are not measured: MKL runs its own Intel-only kernels (on AMD it may take a "
    "generic path), and bf16 GEMMs go through oneDNN (torch takes it with avx512bw/vl/dq, pytorch/pytorch#61891) "
    "instead of the AVX2 fallback measured above. The fold rule compares element counts of two rank-r GEMMs of "
    'one kind, which ISA width scales alike. If a run of this script on an AVX-512 machine shows "narrow" '
    "ahead, the fix is a rule keyed on `torch.backends.cpu.get_cpu_capability()` (a hardware fact, the same in "
    "every process), not a timing.",
    "",
]


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few shapes, one round: checks the script runs")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=0.03, help="seconds per timed block")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DT), default=["fp32", "bf16"])
    p.add_argument("--sections", nargs="+", choices=["gemm", "layer", "fold"], default=["gemm", "layer", "fold"])
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.budget, a.threads, a.dtypes = 1, 0.002, a.threads[:1], ["fp32"]
    before = torch.get_num_threads()
    load0 = harness.loadavg()
    parts = {"gemm": orientation_section, "layer": layer_section, "fold": fold_section}
    try:
        body = [line for s in a.sections for line in parts[s](a, a.threads)]
    finally:
        torch.set_num_threads(before)
    lines = [
        "# CPU choices of the LoRA linear, both ways",
        "",
        "Written by `benchmarks/cpu_choices.py`"
        + (" --quick" if a.quick else f" ({a.rounds} interleaved rounds, torch.utils.benchmark)")
        + ". "
        + " ".join(machine_lines(a.threads)),
        f"Load average (1 min) at the start and end: {load0} and {harness.loadavg()}.",
        "",
        *body,
        *NOT_MEASURED,
    ]
    a.out.write_text("\n".join(lines) + "\n")
    return a.out


if __name__ == "__main__":
    print(main())
