"""The side-by-side section of RESULTS-serve.md: `lorakit serve` against llama.cpp's `llama-server`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from harness import fmt_time, table
from serve_side import LLAMA, LORAKIT, ClientLoad, common_prefix, latencies, rate, same_round


@dataclass
class Side:
    """What the side-by-side run measured: per-round times by "server: workload", the loads, greedy texts."""

    times: dict[str, list[float]]
    loads: dict[str, ClientLoad]
    workloads: list[str]
    compose: bool
    llama: str  # the llama-server binary and its llama.cpp version
    greedy: dict[str, tuple[str, str]] = field(default_factory=dict)  # workload -> (lorakit's, llama-server's)


def judged(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _ratio(side: Side, tokens: int, w: str) -> float | None:
    key_l, key_c = f"{LORAKIT}: {w}", f"{LLAMA}: {w}"
    if key_l not in side.times or key_c not in side.times:
        return None
    return same_round(side.times, tokens, key_l, key_c)


def rows(side: Side, tokens: int) -> list[list[str]]:
    """The throughput and latency table: each workload on each server, lorakit's same-round ratio."""
    out = []
    for w in side.workloads:
        ratio = _ratio(side, tokens, w)
        for server in (LORAKIT, LLAMA):
            key = f"{server}: {w}"
            if key not in side.loads:
                out.append([w, server, "not served", "—", "—", "—", "—", "—"])
                continue
            t50, t95, p50, p95 = latencies(side.loads[key])
            mark = f"{ratio:.2f}×" if ratio is not None and server == LORAKIT else "—"
            speed = f"{rate(side.times[key], tokens):,.1f}"
            out.append([w, server, speed, mark, fmt_time(t50), fmt_time(t95), fmt_time(p50), fmt_time(p95)])
    return out


def targets(a: argparse.Namespace, side: Side, tokens: int) -> tuple[list[list[str]], dict[str, float]]:
    """The issue's targets judged on this run (lorakit serve over HTTP), and the ratios by name."""
    n = a.adapters
    spread, comp = f"{n} adapters", f"{n} compositions"
    r = {w: _ratio(side, tokens, w) for w in side.workloads}
    own = {
        "one/base": same_round(side.times, tokens, f"{LORAKIT}: 1 adapter", f"{LORAKIT}: base"),
        "spread/one": same_round(side.times, tokens, f"{LORAKIT}: {spread}", f"{LORAKIT}: 1 adapter"),
    }
    if f"{LLAMA}: base" in side.times:
        own["llama one/base"] = same_round(side.times, tokens, f"{LLAMA}: 1 adapter", f"{LLAMA}: base")
        own["llama spread/one"] = same_round(side.times, tokens, f"{LLAMA}: {spread}", f"{LLAMA}: 1 adapter")
    out = []
    for w in (spread, comp):
        x = r.get(w)
        what = f"{w}: lorakit serve's throughput ≥ llama-server's"
        missing = "not run" if f"{LLAMA}: {w}" not in side.times else "not served by lorakit"
        out.append([what, missing if x is None else f"{x:.2f}×", "—" if x is None else judged(x >= 1)])
    out.append(
        ["one adapter ≥ 0.95× the base (lorakit serve)", f"{own['one/base']:.2f}×", judged(own["one/base"] >= 0.95)]
    )
    out.append(
        [
            f"{n} adapters ≥ 0.95× one adapter (lorakit serve)",
            f"{own['spread/one']:.2f}×",
            judged(own["spread/one"] >= 0.95),
        ]
    )
    return out, {**own, **{w: x for w, x in r.items() if x is not None}}


def greedy_rows(side: Side) -> list[list[str]]:
    out = []
    for w, (mine, theirs) in side.greedy.items():
        k = common_prefix(mine, theirs)
        out.append([w, repr(mine[:40]), repr(theirs[:40]), f"{k} of {min(len(mine), len(theirs))}"])
    return out


def section(a: argparse.Namespace, side: Side, rounds: int) -> list[str]:
    """The section's markdown lines (the reading of the results is serve.py's, with these numbers)."""
    tokens = a.clients * a.new
    tgt, _ = targets(a, side, tokens)
    off = "" if side.llama.startswith("llama-server ") else " (not run here: `--llama-server off`)"
    comp = (
        ""
        if side.compose
        else (
            f" This `lorakit serve` does not serve per-request compositions yet (no `/lora-adapters` route): its "
            f"{a.adapters}-composition row is not run."
        )
    )
    return [
        "## Side by side: `lorakit serve` and llama.cpp's `llama-server`",
        "",
        f"`{side.llama}`{off}, built by `scripts/build_llama_server.sh` from the llama.cpp sources that "
        "llama-cpp-python's sdist vendors (Release, CPU, built for this CPU), serving the same model exported by "
        "`lorakit export`'s "
        f"library calls (f32 GGUF; {a.adapters} GGUF adapters; the base with the first adapter proven in llama.cpp "
        "by the export's proof, the other adapters written by the same code without it, `--no-proof`) with every "
        f"adapter loaded at scale 0 (`--lora … --lora-init-without-apply`), {a.clients} parallel slots with "
        f"continuous batching (`-np {a.clients} -cb`), {a.threads} thread(s) (`-t`/`-tb`); `lorakit serve` on the "
        f"saved model and adapters with {a.threads} torch thread(s) and `--max-batch {a.clients}`. Both on "
        f"127.0.0.1, both run through the whole benchmark (idle while the other serves). Each load: {a.clients} "
        f"threads of the openai client, streaming, the same {a.prompt}-token token-id prompts, greedy, exactly "
        f"{a.new} new tokens (llama-server: `ignore_eos`, `cache_prompt: false`). Workloads: the base; one "
        f"adapter; request i on adapter i mod {a.adapters} (llama-server: `lora: [{{id: i mod {a.adapters}, "
        "scale: 1}]`; lorakit: `model`); request i on 0.7·adapter(i) + 0.3·adapter(i+1) (llama-server: two `lora` "
        "entries; lorakit: `adapters: [{name, weight}, …]`)." + comp,
        "",
        "### Targets",
        "",
        table(["target", "measured (median same-round ratio)", "verdict"], tgt),
        "",
        "### Throughput and latency",
        "",
        table(
            [
                "workload",
                "server",
                "tokens/s (median)",
                "lorakit ÷ llama-server",
                "TTFT p50",
                "TTFT p95",
                "per-token p50",
                "per-token p95",
            ],
            rows(side, tokens),
        ),
        "",
        f"Tokens/s: {tokens} generated tokens of one round / its wall time (first request sent to last token "
        f"received), median over {rounds} interleaved rounds (these loads and the in-process ones above, in one "
        "rotating order); lorakit ÷ llama-server: the median of same-round ratios. TTFT and per-token as the "
        "client sees them (request sent to first streamed chunk; mean gap between later chunks), p50/p95 over "
        "every request of every round.",
        "",
        "### Greedy outputs (sanity, request 0 of each workload)",
        "",
        table(["workload", "lorakit serve", "llama-server", "same leading characters"], greedy_rows(side)),
        "",
        "Not required to be equal: llama.cpp's f32 kernels sum in another order than torch's, and on a random-weight "
        "model the top two logits can fall within that rounding, so greedy paths may part after a few tokens. Both "
        "serve the same model and adapters (the export's proof, the base with adapter 0, compared every logit of "
        "llama.cpp against lorakit's within its tolerance); a row that parts at its first characters would mean a "
        "request ran other weights (as llama-server's base did when asked with `lora: []`: its slots kept the "
        "previous request's adapters, so the base load sends adapter 0 at scale 0).",
        "",
    ]


def reading(a: argparse.Namespace, side: Side) -> list[str]:
    """The side by side read with this run's numbers: who is faster where, and why."""
    tokens = a.clients * a.new
    _, r = targets(a, side, tokens)
    spread, comp = f"{a.adapters} adapters", f"{a.adapters} compositions"
    if "base" not in r:
        return ["llama-server was not run (`--llama-server off`): no comparison."]
    out = [
        f"**Against llama.cpp's server.** lorakit serve's throughput is {r['base']:.2f}× llama-server's on the base, "
        f"{r['1 adapter']:.2f}× with one adapter and {r[spread]:.2f}× with {a.adapters} adapters"
        + (f", {r[comp]:.2f}× with {a.adapters} compositions." if comp in r else ".")
        + f" llama-server keeps {r['llama one/base']:.2f}× its base throughput with one adapter but only "
        f"{r['llama spread/one']:.2f}× its one-adapter throughput with {a.adapters} (lorakit: "
        f"{r['one/base']:.2f}× and {r['spread/one']:.2f}×): its slots are batched together only while their "
        "LoRA settings (the per-request `lora` scales) are the same, so requests for different adapters are "
        "decoded in separate batches, one pass over the weights each (llama.cpp#10994), where lorakit decodes "
        "every row in one forward with per-row adapter factors.",
    ]
    return out + gap(a, r)


def gap(a: argparse.Namespace, r: dict[str, float]) -> list[str]:
    """Where llama-server is faster: by how much, and what closing it would take."""
    slower = [
        w for w in ("base", "1 adapter", f"{a.adapters} adapters", f"{a.adapters} compositions") if r.get(w, 1) < 1
    ]
    if not slower:
        return []
    ratios = ", ".join(f"{w} {1 / r[w]:.2f}×" for w in slower)
    return [
        "",
        f"**Where llama-server is faster** ({ratios} lorakit serve's throughput): llama.cpp runs a decode step as "
        "one C++ graph over its own kernels (matrix products, fused attention over a preallocated KV cache, no "
        "interpreter between operators), with sampling and detokenising in the same process. lorakit serve runs "
        "transformers' eager Llama forward in PyTorch, a few hundred operator dispatches through Python per step "
        f"at {a.clients} rows × hidden {a.hidden} (small kernels, where dispatch costs a large share), then the "
        "HTTP layer in Python. Closing the gap on one adapter or the base would take the decode step out of eager "
        "Python: the KV cache is now preallocated (its columns grow by doubling, rarely), so the next step is "
        "fixed shapes per bucket of columns, then the whole step compiled (torch.compile) or replayed as one "
        "graph (a CUDA graph on a GPU); the LoRA branch "
        f"itself is a small part of it (one adapter keeps {r['one/base']:.2f}× of lorakit's base throughput and "
        f"{r['llama one/base']:.2f}× of llama-server's).",
    ]
