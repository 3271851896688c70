"""`lorakit serve`'s engine under load: continuous batching across adapters; writes benchmarks/RESULTS-serve.md.

    python benchmarks/serve.py                       # the benchmark model (about 3 minutes on 2 CPU cores)
    python benchmarks/serve.py --quick --out /tmp/s.md   # a tiny model, seconds (the test uses this)

The Llama-style benchmark model of run.py (random weights, fp32, CPU) with 16 LoRA adapters (r=8 on all seven
projections, random non-zero A and B) saved and loaded by name, served by the real `lorakit.serve.Engine` in
this process. 32 clients each send a 64-token prompt (random ids) and take 64 new tokens (greedy, no stop
tokens, so every request generates exactly 64): all on one adapter, spread over 16 adapters, on the base
alone, and one request at a time (each waits for the previous to finish).
Side by side (benchmarks/serve_side.py; `--no-http` skips it): the same loads, and 16 per-request compositions,
through the openai client (32 streaming threads) to a real `lorakit serve` subprocess and to llama.cpp's own
`llama-server` (`--llama-server auto` builds it once with scripts/build_llama_server.sh; `off` runs lorakit alone)
on the same model exported to GGUF. About 13 minutes on 2 shared CPU cores, once llama-server is built.
Every configuration runs once per round; rounds interleave and rotate (benchmarks/harness.py), throughputs
are medians over rounds and ratios medians of same-round ratios; latencies pool every request of every round.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import fmt_time, table  # noqa: E402
from run import TARGETS, add_model_args, build_base  # noqa: E402
from serve_load import Load  # noqa: E402
from serve_servers import bpe_tokenizer  # noqa: E402
from serve_side import ClientLoad, SideBySide  # noqa: E402
from serve_side_report import Side, reading, section  # noqa: E402
from serve_steps import decode_steps, notes  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.serve import Engine, SamplingParams  # noqa: E402

HERE = Path(__file__).resolve().parent
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--clients", type=int, default=32, help="concurrent requests per batched configuration")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--new", type=int, default=64, help="new tokens per request")
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--sequential", type=int, default=8, help="requests of the one-at-a-time configuration")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="the engine's and lorakit serve's device (gpu.sh: cuda)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=0, help="whole warm-up rounds (every server takes a request first)")
    p.add_argument(
        "--no-http",
        dest="http",
        action="store_false",
        help="skip the side by side over HTTP (lorakit serve and llama-server subprocesses)",
    )
    p.add_argument(
        "--llama-server",
        default="auto",
        metavar="PATH|auto|off",
        help="llama.cpp's llama-server binary; auto: build it once into ~/.cache/lorakit/llama-server (minutes)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny model and few requests (for tests)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS-serve.md")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if a.quick:
        a.hidden, a.intermediate, a.layers, a.heads, a.vocab = 32, 64, 2, 2, 128
        a.clients, a.prompt, a.new, a.adapters, a.sequential, a.rounds, a.warmup = 8, 8, 8, 4, 2, 2, 0
        a.http, a.llama_server = False, "off"
    a.seq = a.prompt + a.new  # build_base sizes the context from a.seq
    return a


# -- the served model -------------------------------------------------------------------------------------


def tokenizer(vocab: int):
    """A word-level tokenizer whose ids are the model's whole vocabulary (4 specials, then words w4, w5, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {t: i for i, t in enumerate(SPECIALS)} | {f"w{i}": i for i in range(len(SPECIALS), vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def served_model(a: argparse.Namespace, base: torch.nn.Module, root: Path) -> tuple[torch.nn.Module, list[str]]:
    """The base with `a.adapters` adapters (random non-zero A and B), each saved under root and loaded by name."""
    trained = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=a.rank, alpha=2.0 * a.rank), TARGETS)
    model, names = copy.deepcopy(base), []
    for i in range(a.adapters):
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for layer in lk.lora_layers(trained).values():
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) / layer.lora_A.shape[1] ** 0.5)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
        names.append(f"a{i}")
        lk.save_adapters(trained, root / names[-1])
        lk.load_adapters(model, root / names[-1], name=names[-1])
    return model.eval(), names


def prompts(a: argparse.Namespace, n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIALS), a.vocab, (n, a.prompt), generator=g).tolist()


# -- the configurations ----------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def judged(ok: bool) -> str:
    return "met" if ok else "**missed**"


def measure(a: argparse.Namespace, engine: Engine, inproc: dict[str, Load], served: tuple):
    """Every load in interleaved rounds: the in-process ones and (unless --no-http) the side by side's."""
    base, tok, names, root, ids = served
    loads: dict[str, Load | ClientLoad] = dict(inproc)
    side: SideBySide | None = None
    greedy: dict[str, tuple[str, str]] = {}
    try:
        if a.http:
            side = SideBySide(a, base, tok, names, root, ids)
            greedy = side.warm()
            loads |= side.loads
        for ad in (None, names[0]):  # the engine's first calls
            engine.submit(ids[0][:4], ad, SamplingParams(max_tokens=2, temperature=0.0)).result()
        s = harness.interleaved(loads, a.rounds, warmup=a.warmup, device=a.device)  # type: ignore[arg-type]
    finally:
        if side is not None:
            side.close()
    return s, side, greedy


def main(argv: list[str] | None = None) -> Path:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="lorakit-serve-bench-"))
    base = build_base(a)
    tok = bpe_tokenizer(a.vocab) if a.http else tokenizer(a.vocab)  # llama.cpp reads byte-level BPE only
    model, names = served_model(a, base, root)
    engine = Engine(model, tok, max_batch=a.clients, max_queue=4 * a.clients)
    engine.start()
    params = SamplingParams(max_tokens=a.new, temperature=0.0)
    ids = prompts(a, a.clients, seed=3)
    spread = [names[i % len(names)] for i in range(a.clients)]
    inproc: dict[str, Load] = {
        "base": Load(engine, params, ids, [None] * a.clients),
        "1 adapter": Load(engine, params, ids, [names[0]] * a.clients),
        f"{a.adapters} adapters": Load(engine, params, ids, list(spread)),
        "one at a time": Load(engine, params, ids[: a.sequential], spread[: a.sequential], sequential=True),
    }
    spread_name = f"{a.adapters} adapters"
    s, side, greedy = measure(a, engine, inproc, (base, tok, names, root, ids))
    for load in [*inproc.values(), *(side.loads.values() if side else [])]:
        load.rounds = load.rounds[a.warmup :]  # the warm-up rounds' stats are not reported
    step_rounds = max(5, 3 * a.rounds)
    engine.stop(timeout=10)  # its thread may still hold the last rows' adapters until it idles: join it first
    step = decode_steps(engine, a, ids, names, step_rounds)

    def rate(name: str, r: int | None = None) -> float:
        times = s.times[name]
        return inproc[name].tokens / (statistics.median(times) if r is None else times[r])

    def same_round(name: str, ref: str) -> float:
        return statistics.median(rate(name, r) / rate(ref, r) for r in range(a.rounds))

    rows = []
    for name, load in inproc.items():
        stats = [x for rnd in load.rounds for x in rnd]
        ttft = [x.ttft for x in stats if x.ttft is not None]
        per = [x.per_token for x in stats if x.per_token is not None]
        rows.append(
            [
                name,
                str(len(load.ids)),
                f"{rate(name):,.1f}",
                f"{same_round(name, 'base'):.2f}×",
                f"±{100 * s.spread(name):.0f}%",
                fmt_time(pct(ttft, 0.5)),
                fmt_time(pct(ttft, 0.95)),
                fmt_time(pct(per, 0.5)),
                fmt_time(pct(per, 0.95)),
            ]
        )
    r16, r1 = same_round(spread_name, "1 adapter"), same_round("1 adapter", "base")
    rb = same_round(spread_name, "one at a time")
    targets = [
        [f"{a.adapters}-adapter throughput ≥ 0.95× one-adapter", f"{r16:.2f}×", judged(r16 >= 0.95)],
        ["one-adapter throughput ≥ 0.95× the base", f"{r1:.2f}×", judged(r1 >= 0.95)],
        [f"continuous batching ({a.adapters} adapters) ≥ 4× one at a time", f"{rb:.2f}×", judged(rb >= 4)],
    ]
    step_rows = [
        [
            name,
            fmt_time(t["step"]),
            f"{t['step'] / step['base']['step']:.2f}×",
            fmt_time(t["forward"]),
            f"{t['forward'] / step['base']['forward']:.2f}×",
            fmt_time(t["context"]),
            fmt_time(t["previous"]),
            f"{t['previous'] / t['forward']:.2f}×",
        ]
        for name, t in step.items()
    ]
    if side is not None:
        report = Side(s.times, side.loads, side.workloads, side.compose, side.llama, greedy)
        side_text = section(a, report, a.rounds)
        side_notes = ["", *reading(a, report)]
    else:
        side_text = ["## Side by side with llama.cpp's `llama-server`: not run", "", "(`--quick` or `--no-http`.)", ""]
        side_notes = []
    text = "\n".join(
        [
            "# Serving many adapters: `lorakit serve`'s continuous-batching engine",
            "",
            f"Command: `{' '.join(['python benchmarks/serve.py', *a.argv])}` ({time.perf_counter() - t0:.0f} s)",
            "",
            f"Machine: {harness.machine(a.device, a.threads)}.",
            "",
            f"Model: Llama-style, hidden {a.hidden}, intermediate {a.intermediate}, "
            f"{a.layers} layers, vocab {a.vocab}, "
            f"random weights, fp32; {a.adapters} LoRA adapters r={a.rank} on {', '.join(TARGETS)} (random non-zero A "
            f"and B), saved and loaded by name. Load: {a.clients} concurrent requests, "
            f"{a.prompt}-token prompts (random "
            f"ids), {a.new} new tokens each (greedy, no stop tokens: every request generates exactly {a.new}), served "
            f"by `lorakit.serve.Engine` in this process (max_batch {a.clients}).",
            "",
            "## Targets",
            "",
            table(["target", "measured (median same-round ratio)", "verdict"], targets),
            "",
            "## Throughput and latency",
            "",
            table(
                [
                    "configuration",
                    "requests",
                    "tokens/s (median)",
                    "× base",
                    "noise",
                    "TTFT p50",
                    "TTFT p95",
                    "per-token p50",
                    "per-token p95",
                ],
                rows,
            ),
            "",
            f"Tokens/s: generated tokens of one round / its wall time (first submit to last token), median over "
            f"{a.rounds} interleaved rounds (after {a.warmup} warm-up round(s)); × base is the median of same-round "
            "ratios, noise half the inter-quartile range of the round times (0 with fewer than 4 rounds). TTFT: submit "
            "to first token, so in the batched loads it includes waiting for the prefill of every request that "
            "arrived together; per-token: the mean gap between a request's later tokens (the engine's RequestStats); "
            f"p50/p95 over every request of every round. The {a.adapters}-adapter load sends request i to adapter "
            f"i mod {a.adapters} (mixed batches of all of them). One at a time: {a.sequential} of the same requests "
            f"(adapters a0..a{a.sequential - 1}), each sent when the previous finished (the one-at-a-time load is "
            "slow, so it runs fewer requests; tokens/s stays comparable since every request has the same shape).",
            "",
            "## One decode step of a full batch",
            "",
            table(
                [
                    "adapters in the batch",
                    "step, entering the context",
                    "× base",
                    "step, context held",
                    "× base",
                    "entering the adapter context",
                    "context held, previous cache",
                    "speed-up over the previous cache",
                ],
                step_rows,
            ),
            "",
            f"One decode step of {len(ids)} rows after a {a.prompt}-token prefill, the engine's own pieces "
            "(`serve.groups.adapters` around `generation.kv.Batch.step`), medians over "
            f"{step_rounds} interleaved rounds. The first column enters the adapter context (`disable_adapters`, "
            "`use_adapter` or the engine's `AdapterTable.batch`) around the step; the engine holds it across "
            "decode steps while the batch's rows stay the same, so its steady decode step is the second column, and "
            "the last column (the difference) is paid only when rows join or leave. The previous cache is the one "
            "before the preallocated slab (benchmarks/kv_previous.py: transformers' `DynamicCache`, grown by "
            "`torch.cat` every step), stepped in the same rounds on the same rows (the two take turns first); the "
            "speed-up is its held step over the slab's. Target: the base decode step ≥ 1.1× the previous cache's: "
            f"{step['base']['previous'] / step['base']['forward']:.2f}× "
            f"({judged(step['base']['previous'] / step['base']['forward'] >= 1.1)}).",
            "",
            *side_text,
            "## Reading the results",
            "",
            *notes(a, step, r16),
            *side_notes,
            "",
        ]
    )
    a.out.write_text(text)
    return a.out


if __name__ == "__main__":
    print(f"wrote {main()}")
