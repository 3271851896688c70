"""One decode step of a full batch, per adapter mix, for benchmarks/serve.py: the engine's own pieces
(`serve.groups.adapters` around `generation.kv.Batch.step`), the preallocated cache beside the previous one
(benchmarks/kv_previous.py) in the same interleaved rounds, and what the split says (the page's notes)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import fmt_time, sync  # noqa: E402

from lorakit.serve import Engine  # noqa: E402


def decode_steps(
    engine: Engine, a: argparse.Namespace, ids: list[list[int]], names: list[str], rounds: int
) -> dict[str, dict[str, float]]:
    """One decode step of a full batch per adapter mix: entering the engine's adapter context, and the forward.

    Medians over interleaved rounds of: the whole step as the engine runs it (the context is entered for every
    step), the forward alone (the context already entered) and entering plus leaving the context. Mixed batches
    run over an `AdapterTable` holding every adapter, as the engine's (filled once, before the rounds).
    """
    from lorakit.adapter_table import AdapterTable

    with AdapterTable(engine.model, len(names)) as table:
        table.sync()
        return _decode_steps(engine, a, ids, names, rounds, table)


def _decode_steps(
    engine: Engine, a: argparse.Namespace, ids: list[list[int]], names: list[str], rounds: int, table
) -> dict[str, dict[str, float]]:
    import kv_previous  # the cache before this one (transformers' DynamicCache grown by cat), for the side-by-side

    from lorakit.generation.kv import Batch
    from lorakit.serve.groups import adapters

    mixes: dict[str, list[str | None]] = {
        "base": [None] * len(ids),
        "1 adapter": [names[0]] * len(ids),
        f"{a.adapters} adapters": [names[i % len(names)] for i in range(len(ids))],
    }
    batches: dict[str, dict[str, Any]] = {"forward": {}, "previous": {}}
    with torch.no_grad():
        for name, rows in mixes.items():
            with adapters(engine.model, None, rows, table):
                for kind, cls in (("forward", Batch), ("previous", kv_previous.Batch)):
                    _, batches[kind][name] = cls.prefill(engine.model, ids, 0)
                    batches[kind][name].last = torch.zeros(len(ids), dtype=torch.long, device=a.device)
    out: dict[str, dict[str, list[float]]] = {n: {"step": [], "forward": [], "previous": []} for n in mixes}
    order = list(mixes)
    with torch.no_grad():
        for r in range(rounds + 1):  # round 0 warms up (and the slab's first step doubles it)
            for name in order[r % len(order) :] + order[: r % len(order)]:
                t0 = time.perf_counter()
                with adapters(engine.model, None, mixes[name], table):
                    for kind in ("forward", "previous")[:: 1 if r % 2 else -1]:  # the two caches take turns first
                        t = time.perf_counter()
                        batches[kind][name].step(engine.model)
                        sync(a.device)  # a GPU's step has ended only when its kernels have
                        if r:
                            out[name][kind].append(time.perf_counter() - t)
                t3 = time.perf_counter()
                if r:
                    out[name]["step"].append(t3 - t0 - out[name]["previous"][-1])
    step = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in out.items()}
    for d in step.values():
        d["context"] = d["step"] - d["forward"]
    return step


def notes(a: argparse.Namespace, step: dict[str, dict[str, float]], r16: float) -> list[str]:
    """What the decode-step split says about the targets (numbers from this run; the breakdown from a profile)."""
    mixed, one, base = step[f"{a.adapters} adapters"], step["1 adapter"], step["base"]
    share = mixed["context"] / mixed["step"]
    held = one["forward"] / mixed["forward"]
    return [
        f"**{a.adapters} adapters against one ({r16:.2f}×).** The mixed batch's forward itself is cheap: "
        f"{mixed['forward'] / one['forward']:.2f}× the one-adapter forward (each row's rank-{a.rank} factors "
        "applied with a batched `bmm`/`baddbmm` over gathered per-row copies). Entering a mixed batch only "
        "passes the rows' slots (`AdapterTable.batch`: each adapter was copied into every layer's fixed slots "
        f"when it was loaded): {fmt_time(mixed['context'])} with {a.adapters} adapters ({100 * share:.0f}% of a "
        f"step that enters it), against {fmt_time(one['context'])} for `use_adapter` (it rebinds the active "
        "adapter on every LoRA layer). The engine still holds the context across decode steps while the batch's "
        "rows do not change (that spares `use_adapter`'s walk over the layers), leaving it only for `call`s, "
        "admissions and departures (with completions that arrive together, the rows change a handful of times "
        f"per {a.new} steps): its steady step is the held column, the {a.adapters}-adapter step at {held:.2f}× "
        "the one-adapter step's speed. Prefill, which enters the context once per admission, and the steps "
        "where rows change account for the rest of the gap to the throughput ratio.",
        "",
        f"**One adapter against the base** ({fmt_time(one['forward'])} against {fmt_time(base['forward'])} per "
        "forward) is the rank-8 LoRA branch on seven projections at one token per row: memory-bound GEMVs. "
        "**Continuous batching** decodes every row with one pass over the weights, which is why it is several "
        "times faster than one request at a time even on one thread; its price is time to first token, since "
        f"{a.clients} prompts that arrive together share one prefill. The KV cache is preallocated per layer and "
        "written in place (generation/kv.py, slab.py): transformers' `DynamicCache`, which the previous cache "
        "column still runs, grew it by concatenation (`aten::cat`, 10–17% of a decode step in a profile), "
        f"so the base's held step is {base['previous'] / base['forward']:.2f}× as fast as with it.",
    ]
