"""benchmarks/run.py's report: RESULTS.md from its measurements, with the notes on reading the misses."""

from __future__ import annotations

import os

import harness
from harness import TARGETS, fmt_bytes, fmt_time, table

NOTES = """## Reading the misses (CPU; written from the profiles above and per-layer measurements)

**Training step at dropout 0.** A LoRA layer's rank-r GEMMs cost 6·N·r·(d_in+d_out) multiply-adds per step
(A and B projections forward; dh, dA, dB and the input gradient backward) against the frozen base's
2·N·d_in·d_out (forward and input gradient): 3r(d_in+d_out)/(d_in·d_out) = 9.4% for the 512×512 projections
and 6.4% for the 512×1376 ones at r=8. Linear layers are about two thirds of the frozen step, so at hidden
512 the LoRA arithmetic alone is ≈4–5% of the step even at full GEMM efficiency — and rank-r GEMMs are
memory-bound on CPU (each streams an N×d tensor), so they run well below peak per FLOP. What lorakit does
about it: fold the branch into the weight where that is the smaller pass, deciding forward and backward
apart (x(W+s·BA)ᵀ replaces the N×d_out accumulate when N > d_in; gy(W+s·BA) the N×d_in one when N > d_out);
compute the rank-r projections in the orientation MKL runs fast (h = (A xᵀ)ᵀ and dh = (Bᵀ gyᵀ)ᵀ: 1.5× and
4× faster than x Aᵀ and gy B, whose narrow outputs take a slow kernel); scale at rank r; step AdamW as one
fused kernel (~4 ms → 0.5 ms for the 56 factors). What would close the rest: kernels that read x and gy once
for both the base and the rank-r products (a fused Triton/inductor kernel on GPU), or a bigger model — at
hidden 4096 the same ratio is ≈1%.

**Issue 16, round 2, before and after** (`python benchmarks/ab_linear.py --before e48b440 --rounds 15
[--dropout 0.1]`: the LoRA linear and the trainer's per-tensor AdamW as they were at e48b440 against this
tree's, interleaved with the frozen bound in one process, this process's CPU time on one thread, machine
load 3.0–3.4 on 2 cores; 1 December 2026):

| case | before × frozen bound | after × frozen bound | after / before |
| --- | --- | --- | --- |
| dropout 0 | 1.140 | 1.114 | 0.968 |
| dropout 0.1 | 1.218 | 1.195 | 0.977 |

Where the rest of dropout 0 goes (one step's profile, self CPU time over the frozen bound's): the rank-r
GEMMs, ≈55 ms of the ≈90 ms — dA = dhᵀx and dB = (hᵀgy)ᵀ at ≈0.45 ms per 512-wide layer, h and dh at
≈0.23 ms, 2–3× that for the 1376-wide side — then forming W + s·BA (weight-sized addmm and its copy,
≈15 ms: a fresh weight-sized buffer is page-faulted in every time), the fused AdamW step (≈4 ms) and the
custom Function's own overhead (≈9 ms for 56 calls).

**Sibling fusion (q/k/v, gate/up as one [A_q; A_k; A_v] GEMM): measured, not built.** At N = 1024, one
thread, the three q/k/v projections h cost 1.18 ms apart against 0.80 ms as one GEMM, and their dA 1.20 ms
against 0.81 ms; gate/up 0.80 → 0.60 ms each way: ≈1.2 ms per block, ≈5 ms (0.6%) per step at dropout 0,
and nothing with dropout, where each layer's own mask makes its input x·m_i a different operand (one GEMM
cannot share it). Sharing across the three calls a model makes separately (`self.q_proj(h)`,
`self.k_proj(h)`, ...) needs state that outlives a call — a parent-scoped cache of the group's projection,
guarded by tensor identity, which is what issue 12 removed (it broke checkpointing, threads and compile) —
or a rewrite of each architecture's attention and MLP forward, tied to one transformers version. Neither
is worth 0.6%.

**Training step at dropout 0.1.** Dropout on the LoRA input is elementwise work over N×d_in per layer:
drawing the mask (64-bit random words split into four 16-bit lanes, ~4× cheaper than `torch.rand`), x·mask
forward and again backward (the dropped copy is never stored, to keep memory low), and the masked accumulate
of the input gradient; no fold (the dropped input is not x). Each LoRA layer draws its own mask, as the LoRA
paper and PEFT do (7 draws per block); sharing one draw between siblings, as lorakit did before issue 12,
is not the same regularisation. On GPU a fused kernel could generate the mask (Philox) inside the A GEMM
and regenerate it in backward instead of storing it.

**Inference, merge, unmerge** are memory-bound. Unmerged inference folds the branch into the weight once N
is large (fp32). Merge in place is one fp32 addmm (W + s·B·A), one aminmax finiteness check and a storage
swap: the original weight tensor is set aside untouched, so `unmerge_` is a swap back, exact to the bit
and ~40× faster than PEFT's (which subtracts, and is not exact). That exactness is why merge itself sits at
0.96–1.0× PEFT rather than above: PEFT adds into the existing weight, while lorakit writes the merged weight
into a fresh buffer (first-touch page faults on 28 new weight-sized tensors) and reads it once more for the
finiteness check. Per 1376×512 layer, warm, that is 0.66 ms against PEFT's 0.74 ms. Closing the rest means
adding into the existing weight as PEFT does, which gives up the exact unmerge (or keeping a spare
weight-sized buffer per layer between merges, which costs the memory LoRA is meant to save): not taken.
"""


FAST = (
    "'lorakit fast' = the lorakit p=0 model with `lorakit.hf.fuse.fuse_frozen_blocks` (fused RMSNorm/SwiGLU), "
    "`lorakit.train.compile.compile_blocks` (each decoder block compiled with inductor, one code for every layer) "
    "and the chunked loss (`lorakit.train.chunked_ce.chunked_cross_entropy` on the decoder's hidden states and "
    "the lm_head weight: never the full logits); its compile runs in the warm-up round, not timed. The frozen "
    "bound stays uncompiled: the target asks for the frozen model made cheaper than it was, LoRA included."
)


def fast_target(train) -> list[tuple[str, float, float, str]]:
    """The 'lorakit fast' target row, when the case ran."""
    if "lorakit fast" not in train.times:
        return []
    return [
        (
            "training step ≤ 1.0× frozen bound (uncompiled), lorakit fast",
            train.ratio("lorakit fast", "frozen bound"),
            1.0,
            "le",
        )
    ]


def fast_facts(a) -> str:
    """What the fast case fused and compiled, and its compile time and recompiles (lorakit.train.compile)."""
    info = getattr(a, "fast_info", None)
    if not info:
        return ""
    c = info["compiled"]
    names = getattr(c, "names", None) or getattr(c, "modules", None) or []
    compile_s, recompiles = getattr(c, "compile_s", float("nan")), getattr(c, "recompiles", "?")
    return (
        f"lorakit fast: {info['fused']} modules fused, {len(names)} blocks compiled, compile {compile_s:.1f} s, "
        f"{recompiles} recompiles."
    )


def step_report(a, train, seconds: float) -> str:
    """--cases step: the training-step comparison alone."""
    fb = "frozen bound"
    rows = [
        [n, fmt_time(train.median(n)), f"{train.ratio(n, fb):.3f}×", f"±{100 * train.spread(n):.0f}%"]
        for n in train.times
    ]
    t_rows = [[t, f"{v:.3f}", "met" if v <= lim else "**missed**"] for t, v, lim, _ in fast_target(train)]
    return "\n".join(
        [
            "# Training step: lorakit fast vs the uncompiled frozen bound",
            "",
            f"Command: `python benchmarks/run.py {' '.join(a.argv)}`. Total {seconds:.0f} s.",
            "",
            f"Machine: {harness.machine(a.device, a.threads)}. Load average (1 min) at start {a.load_start:.2f}, "
            f"at end {os.getloadavg()[0]:.2f}.",
            "",
            f"Model: hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers, vocab {a.vocab}; batch "
            f"{a.batch} × {a.seq} tokens; LoRA r{a.rank} on {', '.join(TARGETS)}; {a.rounds} interleaved rounds.",
            "",
            "## Targets",
            "",
            table(["target", "measured", ""], t_rows),
            "",
            "## Training step",
            "",
            FAST + " " + fast_facts(a),
            "",
            table(["case", "median", "× frozen bound (same round)", "spread"], rows),
            "",
        ]
    )


# -- models -------------------------------------------------------------------------------------------


def report(a, train, saved, rss, inf, ops, diffs, prof, seconds) -> str:
    p = f"{a.dropout:g}"
    fb = "frozen bound"
    rows = [
        [n, fmt_time(train.median(n)), f"{train.ratio(n, fb):.3f}×", f"±{100 * train.spread(n):.0f}%"]
        for n in train.times
    ]
    lora_bytes = {n: saved[n] - saved[fb] for n in saved if n not in (fb, "full fine-tuning")}
    mem_rows = []
    for n in saved:
        lb = lora_bytes.get(n)
        peft_name = n.replace("lorakit", "PEFT")
        vs = f"{lb / lora_bytes[peft_name]:.2f}×" if n.startswith("lorakit") and lora_bytes.get(peft_name) else ""
        r = rss[n] if rss else None
        mem_rows.append(
            [
                n,
                fmt_bytes(saved[n]),
                fmt_bytes(lb) if lb is not None else "",
                vs,
                fmt_bytes(r["peak"]) if r else "—",
                fmt_bytes(r["peak"] - r["before"]) if r else "—",
            ]
        )
    inf_rows = [
        [n, fmt_time(inf.median(n)), f"{inf.ratio(n, 'base'):.3f}×", f"±{100 * inf.spread(n):.0f}%"] for n in inf.times
    ]
    op_names = ["save", "load into a fresh base", "load-and-activate (hot swap)", "merge", "unmerge"]
    op_rows = [
        [
            o,
            fmt_time(ops[f"{o}: lorakit"]),
            fmt_time(ops[f"{o}: PEFT"]),
            f"{ops[f'{o}: PEFT'] / ops[f'{o}: lorakit']:.1f}×",
        ]
        for o in op_names
    ]
    hs = "load-and-activate (hot swap): PEFT hotswap_adapter"
    op_rows.append(
        [
            "hot swap vs PEFT's `hotswap_adapter`",
            fmt_time(ops["load-and-activate (hot swap): lorakit"]),
            fmt_time(ops[hs]),
            f"{ops[hs] / ops['load-and-activate (hot swap): lorakit']:.1f}×",
        ]
    )

    lk_lora, pf_lora = lora_bytes[f"lorakit p={p}"], lora_bytes[f"PEFT p={p}"]
    swap = ops["load-and-activate (hot swap): PEFT"] / ops["load-and-activate (hot swap): lorakit"]
    targets = [
        ("training step ≤ 1.05× frozen bound, p=0", train.ratio("lorakit p=0", fb), 1.05, "le"),
        (f"training step ≤ 1.12× frozen bound, p={p}", train.ratio(f"lorakit p={p}", fb), 1.12, "le"),
        (f"LoRA-branch saved bytes ≤ 0.5× PEFT's, p={p}", lk_lora / pf_lora if pf_lora else float("nan"), 0.5, "le"),
        ("unmerged inference ≤ 1.02× base forward", inf.ratio("lorakit unmerged", "base"), 1.02, "le"),
        ("load-and-activate ≥ 5× faster than PEFT", swap, 5.0, "ge"),
        ("merge no slower than PEFT (PEFT / lorakit ≥ 1)", ops["merge: PEFT"] / ops["merge: lorakit"], 1.0, "ge"),
        ("unmerge no slower than PEFT (PEFT / lorakit ≥ 1)", ops["unmerge: PEFT"] / ops["unmerge: lorakit"], 1.0, "ge"),
    ]
    targets += fast_target(train)
    t_rows = [
        [t, f"{v:.3f}", "met" if (v <= lim if how == "le" else v >= lim) else "**missed**"]
        for t, v, lim, how in targets
    ]
    n_tok = a.batch * a.seq
    prof_text = []
    for name, rows_ in prof.items():
        extra = sum(r[1] - r[2] for r in rows_)
        prof_text += [
            f"One step of {name} against one of the frozen bound (self CPU ms per op, largest "
            f"differences; these {len(rows_)} ops account for {extra:+.0f} ms):",
            "",
            table(
                ["op", name, "frozen bound", "difference"],
                [[f"`{k}`", f"{x:.1f}", f"{y:.1f}", f"{x - y:+.1f}"] for k, x, y in rows_],
            ),
            "",
        ]
    return "\n".join(
        [
            "# Benchmark results: lorakit vs PEFT vs the cost floor",
            "",
            "Command: `" + " ".join(["python benchmarks/run.py", *a.argv]) + "`",
            f"({'quick mode, a tiny model: not meaningful numbers' if a.quick else 'full run'}; {seconds:.0f} s)",
            "",
            f"Machine: {harness.machine(a.device, a.threads)}. Load average (1 min) at the start and end: "
            f"{a.load_start:.2f} and {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (a shared machine: other "
            "load widens the noise column).",
            "",
            f"Model: Llama-style (transformers `LlamaForCausalLM` from a config, fp32), hidden {a.hidden}, "
            f"intermediate {a.intermediate}, {a.layers} layers, {a.heads} heads, vocab {a.vocab}; LoRA r={a.rank}, "
            f"alpha={2 * a.rank} on {', '.join(TARGETS)}; batch {a.batch} × {a.seq} = {n_tok} tokens. "
            f"Training rounds: {a.rounds}; inference/adapter rounds: {a.fast_rounds}. Times are medians; ratios are "
            "medians of same-round ratios; ± is half the inter-quartile range.",
            "",
            "## Targets",
            "",
            table(["target", "measured", ""], t_rows),
            "",
            "## Training step (forward + backward + AdamW)",
            "",
            table(["case", "median", "× frozen bound", "noise"], rows),
            "",
            *([FAST + " " + fast_facts(a), ""] if "lorakit fast" in train.times else []),
            "The frozen bound is the same model with every weight frozen, back-propagating through activations only. "
            "lorakit, PEFT and the frozen bound all take the token embeddings as an input that requires grad, so "
            "their backward passes cover the same activations and differ only by the LoRA branches. Full "
            "fine-tuning takes token ids and trains every weight (embeddings included).",
            "",
            "### Where LoRA's extra time goes (torch.profiler)",
            "",
            *prof_text,
            "## Memory",
            "",
            table(
                ["case", "saved for backward", "LoRA branch (over frozen)", "× PEFT", "peak RSS", "peak − before step"],
                mem_rows,
            ),
            "",
            "Saved-for-backward bytes count distinct storages seen by `torch.autograd.graph.saved_tensors_hooks` in "
            "one forward, parameters excluded. The LoRA branch's share is the case's total minus the frozen bound's "
            "(the frozen model saves nothing for its linear layers' inputs, so everything over it is LoRA's). Peak RSS "
            "comes from a fresh process per case (two steps; VmHWM reset after the model is built)"
            + (" — skipped in this run." if rss is None else "."),
            "",
            "## Inference forward (no_grad, eval)",
            "",
            table(["case", "median", "× base", "noise"], inf_rows),
            "",
            "Sanity (max |Δ logits|): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()) + ".",
            "",
            "## Adapter operations (28 LoRA modules at the default size)",
            "",
            table(["operation", "lorakit", "PEFT", "PEFT / lorakit"], op_rows),
            "",
            "Save: `lk.save_adapters` vs `save_pretrained`. Load into a fresh base: `lk.load_adapters` on a model "
            "without LoRA vs `PeftModel.from_pretrained`. Load-and-activate: read "
            "another adapter from disk and make it "
            "the one the model runs: `lk.load_adapters` into the LoRA model vs `load_adapter` + `set_adapter` (and, "
            "separately, PEFT's in-place `hotswap_adapter`). Merge/unmerge: reversible "
            "in place, `lk.merge_`/`lk.unmerge_` "
            "vs `merge_adapter`/`unmerge_adapter`.",
            "",
            NOTES,
            "",
            "## The other suites",
            "",
            "`bash benchmarks/all.sh` runs this file's suite and the others, each writing its own page: "
            "[mixed-adapter batches](RESULTS-adapters.md) (`benchmarks/adapters.py`), "
            "[DoRA and QLoRA](RESULTS-variants.md) (`benchmarks/variants.py`), "
            "[1 → 2 processes](RESULTS-distributed.md) (`benchmarks/distributed.py`), "
            "[gradient checkpointing and packing](RESULTS-checkpointing.md) (`benchmarks/checkpointing.py`), "
            "[the serving engine](RESULTS-serve.md) (`benchmarks/serve.py`), "
            "[end to end against Trainer + PEFT](RESULTS-e2e.md) (`benchmarks/e2e.py`), "
            "[scale curves](RESULTS-scale.md) (`benchmarks/scale.py`), [export](RESULTS-export.md) "
            "(`benchmarks/export.py`), [LoRA on MoE experts](RESULTS-moe.md) (`benchmarks/moe.py`), "
            "[mixed MoE adapter batches](RESULTS-moe-mixed.md) (`benchmarks/moe_mixed.py`) and "
            "[DPO and GRPO against TRL + PEFT](RESULTS-preference.md) (`benchmarks/preference.py`).",
            "",
        ]
    )
