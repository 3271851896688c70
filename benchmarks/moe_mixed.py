"""Many expert adapters on one MoE base: a mixed-adapter batch against the same batch on one adapter (lorakit).

    .venv/bin/python benchmarks/moe_mixed.py                  # writes benchmarks/RESULTS-moe-mixed.md
    .venv/bin/python benchmarks/moe_mixed.py --quick --out /tmp/r.md   # a tiny model, seconds (the test uses this)

The Qwen3-MoE of benchmarks/moe.py (8 experts, top-2, hidden 512, 4 layers, random weights, fp32), 8 adapters of
rank 8 on the attention projections and every expert weight (each adapter's factors random, seeded); a batch of 8
rows in which row i uses adapter i (`lk.mixed_batch`), against the same batch on one adapter (`set_adapter`), and
the base with adapters disabled; inference (no_grad), a forward over the prompt and 16 decode steps with the KV
cache; 1 thread, interleaved rounds, medians of same-round ratios (benchmarks/harness.py). PEFT has no mixed batches
for `target_parameters` (its ParamWrapper refuses `adapter_names`), so there is no PEFT row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from moe import ATTENTION, EXPERTS, build_base  # noqa: E402

import lorakit as lk  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET = 1.15  # the issue's: a mixed batch of 8 expert adapters at most 1.15× one adapter's batch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--seq", type=int, default=32, help="prompt tokens per row")
    p.add_argument("--steps", type=int, default=16, help="decode steps after the prompt")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a tiny model and few rounds (for tests)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS-moe-mixed.md")
    a = p.parse_args(argv)
    model = dict(hidden=512, moe_intermediate=512, experts=8, top_k=2, layers=4, heads=8, vocab=4096)
    if a.quick:
        model.update(hidden=32, moe_intermediate=32, experts=4, layers=2, heads=4, vocab=128)
        a.adapters, a.seq, a.steps, a.rounds = min(a.adapters, 4), 8, 2, 2
    vars(a).update(model)
    return a


def build(a: argparse.Namespace) -> tuple[torch.nn.Module, list[str]]:
    """The benchmark MoE with `a.adapters` named adapters on attention + every expert weight, factors random."""
    names = [f"a{i}" for i in range(a.adapters)]
    cfg = lk.LoraConfig(rank=a.rank, alpha=2.0 * a.rank)
    model = lk.apply_lora(build_base(a), cfg, ATTENTION, target_parameters=EXPERTS, adapter_name=names[0])
    for layer in lk.lora_layers(model).values():
        for n in names[1:]:
            layer.adapters.add(n, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init would make every adapter the base; distinct random factors instead
        for layer in lk.lora_layers(model).values():
            for n in names:
                for t in layer.adapters.tensors(n).values():
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
    lk.set_adapter(model, names[0])
    return model.eval(), names


def generate(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """The prompt's forward, then `steps` greedy decode steps with the KV cache: the last logits."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return out.logits


def agreement(model: torch.nn.Module, names: list[str], ids: torch.Tensor) -> float:
    """Max |Δlogit| between the mixed batch and each row run alone on its adapter (checked before timing)."""
    with torch.no_grad(), lk.mixed_batch(model, names):
        mixed = model(input_ids=ids).logits
    alone = []
    for i, n in enumerate(names):
        with torch.no_grad(), lk.use_adapter(model, n):
            alone.append(model(input_ids=ids[i : i + 1]).logits)
    return (mixed - torch.cat(alone)).abs().max().item()


def main(argv: list[str] | None = None) -> Path:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model, names = build(a)
    ids = torch.randint(0, a.vocab, (a.adapters, a.seq), generator=torch.Generator().manual_seed(2))
    agree = agreement(model, names, ids)

    def mixed() -> None:
        with lk.mixed_batch(model, names):
            generate(model, ids, a.steps)

    def base() -> None:
        with lk.disable_adapters(model):
            generate(model, ids, a.steps)

    cases = {"base (adapters disabled)": base, "one adapter": lambda: generate(model, ids, a.steps), "mixed": mixed}
    s = harness.interleaved(cases, a.rounds, warmup=1, device="cpu")
    a.out.write_text(report(a, argv, time.perf_counter() - t0, agree, s))
    return a.out


def report(a: argparse.Namespace, argv: list[str] | None, seconds: float, agree: float, s: harness.Samples) -> str:
    """RESULTS-moe-mixed.md: the three cases, the ratio against the target, the agreement, the machine."""
    ratio = s.ratio("mixed", "one adapter")
    rows = [
        f"| {n} | {s.median(n) * 1e3:,.1f} ms | {s.ratio(n, 'one adapter'):.3f}× | ±{100 * s.spread(n):.0f}% |"
        for n in ("base (adapters disabled)", "one adapter", "mixed")
    ]
    load = " ".join(Path("/proc/loadavg").read_text().split()[:1]) if Path("/proc/loadavg").exists() else "?"
    return "\n".join(
        [
            "# Many expert adapters on one MoE base: a mixed-adapter batch vs one adapter",
            "",
            f"Command: `{' '.join(['python benchmarks/moe_mixed.py', *(argv or [])])}` ({seconds:.0f} s)",
            "",
            f"Machine: {harness.machine('cpu', a.threads)}. Load average (1 min) at the end: {load}.",
            "",
            f"Model: Qwen3-MoE from a config, hidden {a.hidden}, {a.layers} layers, {a.experts} experts of "
            f"intermediate size {a.moe_intermediate}, top-{a.top_k}, vocab {a.vocab}; {a.adapters} adapters of rank "
            f"{a.rank} on q/k/v/o and every expert weight; {a.adapters} rows × {a.seq} prompt tokens, then {a.steps} "
            f"decode steps (KV cache), no_grad; {a.rounds} interleaved rounds.",
            "",
            "| case | time (median) | × one adapter | noise |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
            f"Target: the mixed batch (row i on adapter i) ≤ {TARGET}× the same batch on one adapter: {ratio:.3f}, "
            + ("met." if ratio <= TARGET else "**missed**."),
            "",
            f"Agreement: the mixed batch equals each row run alone on its adapter to {agree:.1e} (max |Δlogit|).",
            "",
        ]
    )


if __name__ == "__main__":
    print(main())
