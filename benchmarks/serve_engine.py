"""The serving engine's throughput: continuous batching over one adapter, 16 adapters, the base, one at a time.

    python benchmarks/serve_engine.py            # writes benchmarks/RESULTS-serve.md

The Llama-style benchmark model (benchmarks/run.py's shape, random weights, fp32), 16 adapters of rank 8
on all seven projections. Each case submits `--clients` requests at once (`--prompt` tokens each,
`--new` new tokens, greedy, no stop) to a `lorakit.serve.Engine` and waits for all of them:
"one adapter" (every request on a0), "16 adapters" (spread evenly), "base" (no adapter), and "one at a
time" (max_batch=1: the same requests, served one after another). Cases are interleaved over rounds;
the table gives medians (throughput) and p50/p95 over all requests of all rounds (latencies).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from run import TARGETS, add_model_args, build_base  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.serve import Engine, SamplingParams  # noqa: E402


class _Ids:
    """A tokenizer stand-in: the benchmark reads token ids, the engine's text is not needed."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def run_case(model, rows, new: int, max_batch: int) -> dict:
    """Serve every (prompt, adapter) row at once; tokens/s over the whole case and each request's stats."""
    engine = Engine(model, _Ids(), max_batch=max_batch, max_queue=len(rows))
    engine.start()
    t0 = time.perf_counter()
    handles = [engine.submit(p, a, SamplingParams(max_tokens=new)) for p, a in rows]
    done = [h.result() for h in handles]
    wall = time.perf_counter() - t0
    engine.stop(10)
    assert all(c.completion_tokens == new for c in done)
    stats = [h.stats() for h in handles]
    return {"tps": sum(c.completion_tokens for c in done) / wall, "ttft": [s.ttft for s in stats],
            "per_token": [s.per_token for s in stats]}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="a tiny model and few requests (the test runs this)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS-serve.md")
    a = p.parse_args(argv)
    if a.quick:
        a.hidden, a.intermediate, a.layers, a.heads, a.vocab = 64, 128, 2, 4, 256
        a.adapters, a.clients, a.prompt, a.new, a.rounds = 4, 8, 8, 8, 1
    a.seq = a.prompt + a.new
    torch.set_num_threads(a.threads)
    base = build_base(a).eval()
    names = [f"a{i}" for i in range(a.adapters)]
    tmp = Path(tempfile.mkdtemp())
    gen = torch.Generator().manual_seed(0)
    for n in names:
        m = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=a.rank, alpha=2.0 * a.rank), TARGETS)
        with torch.no_grad():
            for layer in lk.lora_layers(m).values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
        lk.save_adapters(m, tmp / n)
        del m
    model = base
    for n in names:
        lk.load_adapters(model, tmp / n, name=n)
    prompts = [torch.randint(1, a.vocab, (a.prompt,), generator=gen).tolist() for _ in range(a.clients)]
    cases = {
        "one adapter": ([(q, names[0]) for q in prompts], a.clients),
        f"{a.adapters} adapters": ([(q, names[i % a.adapters]) for i, q in enumerate(prompts)], a.clients),
        "base": ([(q, None) for q in prompts], a.clients),
        "one at a time": ([(q, names[0]) for q in prompts], 1),
    }
    run_case(model, cases["one adapter"][0][:2], 2, a.clients)  # warm-up
    results: dict[str, list[dict]] = {c: [] for c in cases}
    for _ in range(a.rounds):
        for c, (rows, max_batch) in cases.items():
            results[c].append(run_case(model, rows, a.new, max_batch))
    tps = {c: statistics.median(r["tps"] for r in rs) for c, rs in results.items()}
    rows = []
    for c, rs in results.items():
        ttft = [x for r in rs for x in r["ttft"]]
        per = [x for r in rs for x in r["per_token"]]
        rows.append([c, f"{tps[c]:,.1f}", harness.fmt_time(pct(ttft, 0.5)), harness.fmt_time(pct(ttft, 0.95)),
                     harness.fmt_time(pct(per, 0.5)), harness.fmt_time(pct(per, 0.95))])
    many = f"{a.adapters} adapters"
    targets = [
        [f"{many} ≥ 0.9× one adapter", f"{tps[many] / tps['one adapter']:.2f}×"],
        ["one adapter ≥ 0.85× base", f"{tps['one adapter'] / tps['base']:.2f}×"],
        ["continuous batching ≥ 4× one at a time", f"{tps['one adapter'] / tps['one at a time']:.2f}×"],
    ]
    text = "\n\n".join([
        "# Serving engine: continuous batching across adapters",
        f"Machine: {harness.machine(a.device, a.threads)}",
        f"Model: Llama-style, hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers, {a.heads} heads, "
        f"vocab {a.vocab}, fp32, random weights; {a.adapters} adapters of rank {a.rank} on {', '.join(TARGETS)}. "
        f"{a.clients} requests submitted at once, {a.prompt}-token prompts, {a.new} new tokens each, greedy; "
        f"{a.rounds} interleaved rounds. `python benchmarks/serve_engine.py`.",
        "## Targets (issue #14)",
        harness.table(["target", "measured"], targets),
        "## Throughput and latency",
        harness.table(["case", "tokens/s (median)", "TTFT p50", "TTFT p95", "per token p50", "per token p95"], rows),
        "TTFT counts from submit, so with all requests submitted at once it includes waiting for a slot "
        "(one at a time: the whole queue ahead). Per-token latency is a request's mean gap between tokens.",
    ]) + "\n"
    a.out.write_text(text, encoding="utf-8")
    print(text)
    return a.out


if __name__ == "__main__":
    main()
