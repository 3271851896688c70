"""Timing and reporting helpers for the benchmark: interleaved repeats, medians, paired ratios, the machine.

Timings on a shared machine drift; interleaving the cases inside each round and taking the median of
*paired* ratios (case_i / reference_i within the same round) cancels most of that drift.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# the benchmark model's LoRA targets: all seven projections of a Llama-style block (every suite)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds one call of `fn` takes, with the device drained before and after (`clock`: wall time by default;
    time.process_time counts this process's CPU time only, which other load on a shared CPU perturbs less)."""
    sync(device)
    t = clock()
    fn()
    sync(device)
    return clock() - t


@dataclass
class Samples:
    """Per-round timings of every case in one interleaved group."""

    times: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, name: str, ref: str) -> float:
        """The median over rounds of time(name) / time(ref) measured in the same round."""
        return statistics.median(a / b for a, b in zip(self.times[name], self.times[ref], strict=False))

    def spread(self, name: str) -> float:
        """Half the inter-quartile range relative to the median: how noisy this case was."""
        xs = sorted(self.times[name])
        if len(xs) < 4:
            return 0.0
        q = statistics.quantiles(xs, n=4)
        return (q[2] - q[0]) / 2 / statistics.median(xs)


def interleaved(
    cases: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    device: str,
    setup: dict[str, Callable[[], object]] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Samples:
    """Run every case once per round, rotating the order each round; `setup[name]` runs untimed before a case."""
    setup = setup or {}
    names = list(cases)
    for _ in range(warmup):
        for n in names:
            if n in setup:
                setup[n]()
            cases[n]()
    out = Samples({n: [] for n in names})
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            if n in setup:
                setup[n]()
            out.times[n].append(timed(cases[n], device, clock))
    return out


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages ("3.18 / 3.80 / 4.43"), or "n/a" where /proc has none."""
    try:
        with open("/proc/loadavg") as f:
            return " / ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def isa() -> str:
    """The CPU's vector ISA level as torch's CPU kernels see it (AVX-512, AVX2, ...), with /proc/cpuinfo's flags."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line.split(":", 1)[1].split() for line in f if line.startswith("flags")))
    except (OSError, StopIteration):
        pass
    level = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2" if flags else "?"
    extras = [name for flag, name in (("avx512_bf16", "bf16"), ("amx_tile", "AMX")) if flag in flags]
    capability = torch.backends.cpu.get_cpu_capability()  # what torch dispatches to: "AVX512", "AVX2", "DEFAULT"
    return f"{level}{' + ' + ', '.join(extras) if extras else ''} (torch kernels: {capability})"


def machine(device: str, threads: int) -> str:
    """One line describing where the numbers came from: CPU model and ISA, device, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cpu = f"{cpu}, {isa()}"
    import peft
    import transformers

    dev = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {threads} torch thread(s)"
    return (
        f"{cpu} ({os.cpu_count()} logical cores); {dev}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    )


def fmt_time(s: float) -> str:
    return f"{s * 1e3:,.1f} ms" if s >= 1e-3 else f"{s * 1e6:,.0f} µs"


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
