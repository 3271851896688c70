"""LoRA variants side by side: DoRA's cost over plain LoRA (lorakit and PEFT), QLoRA's memory, speed and error.

    .venv/bin/python benchmarks/variants.py                 # about a minute on a few CPU cores
    .venv/bin/python benchmarks/variants.py --quick         # a tiny model, seconds
    .venv/bin/python benchmarks/variants.py --d 2048 --tokens 1024 --threads 8

Model: a stack of `--layers` d×d linear layers with GELU between them, LoRA (rank `--rank`) on every
layer, one training step = forward + backward (fp32 or `--dtype bf16`, AdamW excluded) on `--tokens` rows.
Each case runs once per round, rounds interleave and rotate; ratios are medians of same-round ratios
(benchmarks/harness.py). `--profile CASE` prints torch.profiler's table of one case's step instead.
Prints a markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit import bases  # noqa: E402
from lorakit.variants import dora as dora_math  # noqa: E402
from lorakit.variants import nf4 as lk_nf4  # noqa: E402
from lorakit.variants.quant import quantize_base, quantized_layers  # noqa: E402


def stack(d: int, layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(d, d)] + ([nn.GELU()] if i < layers - 1 else [])
    return nn.Sequential(*mods)


def targets(model: nn.Sequential) -> list[str]:
    return [str(i) for i, m in enumerate(model) if isinstance(m, nn.Linear)]


def randomise(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def step(model: nn.Module, x: torch.Tensor):
    def run():
        model(x).square().mean().backward()
        for p in model.parameters():
            p.grad = None

    return run


DEQUANTISE = "dequantise NF4"  # the profiler's label for every NF4 dequantisation


def labelled(fn):
    """`fn` inside a profiler range named DEQUANTISE."""

    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(DEQUANTISE):
            return fn(*args, **kwargs)

    return wrapped


def torchao_dequantise(run):
    """`run` with NF4 weights dequantised by torchao's own `get_original_weight` (lorakit's path before issue #16)."""

    def patched():
        fast = lk_nf4.dequantize
        torchao = lambda w, dtype=None: w.get_original_weight().to(dtype or w.dtype)  # noqa: E731
        lk_nf4.dequantize = labelled(torchao) if getattr(fast, "labelled", False) else torchao
        try:
            run()
        finally:
            lk_nf4.dequantize = fast

    return patched


def profile(run, rows: int, steps: int = 3) -> str:
    """torch.profiler's table of `steps` calls of `run` (after one warm-up), by self CPU time, with the time
    spent dequantising NF4 weights (ops inside lorakit.variants.nf4.dequantize, or torchao's path) summed per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    fast = lk_nf4.dequantize
    lk_nf4.dequantize = labelled(fast)
    lk_nf4.dequantize.labelled = True
    try:
        run()
        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(steps):
                run()
    finally:
        lk_nf4.dequantize = fast
    events = p.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    deq = [e for e in events if e.key == DEQUANTISE]
    deq_ms = deq[0].cpu_time_total / steps / 1e3 if deq else 0.0
    calls = deq[0].count // steps if deq else 0
    return (
        events.table(sort_by="self_cpu_time_total", row_limit=rows)
        + f"\nper step: {total:.1f} ms CPU, of which {deq_ms:.1f} ms ({deq_ms / total:.0%}) dequantising NF4 "
        f"in {calls} calls ({deq_ms / max(calls, 1):.2f} ms each)"
    )


def peft_model(base: nn.Module, rank: int, dora: bool) -> nn.Module:
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets(base), use_dora=dora),
        )
    return randomise(m)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the model's and the input's dtype")
    p.add_argument("--quick", action="store_true", help="d=128, 2 layers, 64 tokens, 3 rounds")
    p.add_argument(
        "--profile",
        metavar="CASE",
        help="print torch.profiler's table of CASE's step (e.g. nf4, nf4-torchao, lora) instead of the comparison",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.d, a.layers, a.tokens, a.rounds = 128, 2, 64, 3
    return a


def dora_norm_timing(layer: nn.Module, rounds: int):
    """DoRA's per-step row norm of one layer: the expansion (one d_out×r product) vs forming W + s·B A (PEFT's
    way); (the timings, the largest difference between the two)."""
    W, A, B = bases.dense_weight(layer.base), layer.lora_A, layer.lora_B
    sq = dora_math.row_sqnorm(W)
    norms = harness.interleaved(
        {
            "expanded": lambda: dora_math.weight_norm(W, A, B, layer.scaling, sq),
            "formed": lambda: dora_math.weight_norm_reference(W, A, B, layer.scaling),
        },
        rounds=max(rounds, 9),
        warmup=2,
        device="cpu",
    )
    norm_err = (
        (dora_math.weight_norm(W, A, B, layer.scaling, sq) - dora_math.weight_norm_reference(W, A, B, layer.scaling))
        .abs()
        .max()
        .item()
    )
    return norms, norm_err


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    base = stack(a.d, a.layers).to(dtype)
    x = torch.randn(a.tokens, a.d, generator=torch.Generator().manual_seed(2)).to(dtype)
    cfg = lk.LoraConfig(rank=a.rank, alpha=2.0 * a.rank)
    lora = randomise(lk.apply_lora(copy.deepcopy(base), cfg, targets(base)))
    dora = randomise(
        lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=a.rank, alpha=2.0 * a.rank, use_dora=True), targets(base))
    )
    nf4 = quantize_base(copy.deepcopy(lora), "nf4")
    int8 = quantize_base(copy.deepcopy(lora), "int8")
    cases = {
        "lora": step(lora, x),
        "dora": step(dora, x),
        "nf4": step(nf4, x),
        "nf4-torchao": torchao_dequantise(step(nf4, x)),
        "int8": step(int8, x),
    }
    if a.profile:
        print(profile(cases[a.profile], rows=20))
        return 0
    try:
        cases["peft-lora"] = step(peft_model(base, a.rank, False), x)
        cases["peft-dora"] = step(peft_model(base, a.rank, True), x)
    except ImportError:
        pass
    s = harness.interleaved(cases, rounds=a.rounds, warmup=1, device="cpu")

    norms, norm_err = dora_norm_timing(dora[0], a.rounds)

    # QLoRA: bytes of the wrapped layers' frozen weights vs bf16, output error vs the unquantised model
    n_weights = sum(layer.base.in_features * layer.base.out_features for layer in quantized_layers(nf4).values())
    with torch.no_grad():
        y = lora(x)
        err = {fmt: ((m(x) - y).float().norm() / y.float().norm()).item() for fmt, m in (("nf4", nf4), ("int8", int8))}
    mem = {
        fmt: sum(layer.base.weight_bytes() for layer in quantized_layers(m).values()) / (2 * n_weights)
        for fmt, m in (("nf4", nf4), ("int8", int8))
    }

    def row(name, what, extra_mem="—", extra_err="—"):
        ratio = s.ratio(name, "lora")
        return [name, what, harness.fmt_time(s.median(name)), f"{ratio:.2f}×", extra_mem, extra_err]

    rows = [
        row("lora", "plain LoRA (reference)", "1.00× fp32 = 2.00× bf16" if a.dtype == "fp32" else "1.00× bf16"),
        row("dora", "lorakit DoRA"),
    ]
    if "peft-dora" in cases:
        rows += [row("peft-lora", "PEFT LoRA"), row("peft-dora", "PEFT DoRA")]
    rows += [
        row("nf4", "QLoRA, NF4 base (torchao), lorakit's dequantise", f"{mem['nf4']:.3f}× bf16", f"{err['nf4']:.4f}"),
        row("nf4-torchao", "the same, torchao's dequantise (before)", f"{mem['nf4']:.3f}× bf16", f"{err['nf4']:.4f}"),
        row("int8", "QLoRA, int8 base (per-row absmax)", f"{mem['int8']:.3f}× bf16", f"{err['int8']:.4f}"),
    ]
    print(
        f"{a.layers} × Linear({a.d}, {a.d}), rank {a.rank}, {a.tokens} tokens, {a.dtype} forward+backward; "
        f"{a.rounds} interleaved rounds\n{harness.machine('cpu', a.threads)}\n"
    )
    print(
        harness.table(
            ["case", "what", "step (median)", "vs lorakit LoRA", "frozen weight memory", "output rel. error"], rows
        )
    )
    if "peft-dora" in cases:
        print(
            f"\nDoRA overhead: lorakit {s.ratio('dora', 'lora'):.2f}× its LoRA; "
            f"PEFT {s.ratio('peft-dora', 'peft-lora'):.2f}× its LoRA"
        )
    print(
        f"\nDoRA row norm per layer and step: expanded {harness.fmt_time(norms.median('expanded'))} vs formed "
        f"{harness.fmt_time(norms.median('formed'))} ({norms.ratio('formed', 'expanded'):.1f}× slower); "
        f"max |difference| {norm_err:.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
