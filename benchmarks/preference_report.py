"""The RESULTS-preference.md page of benchmarks/preference.py: targets, DPO, GRPO rollouts, GRPO steps."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import harness

DPO_SIDES = ("lorakit-dpo", "trl-dpo")
GRPO_SIDES = ("lorakit-grpo", "trl-grpo")
NAMES = {
    "lorakit-dpo": "lorakit DPOObjective (reference cached)",
    "trl-dpo": "TRL DPOTrainer + PEFT",
    "lorakit-grpo": "lorakit GRPOObjective (EngineSampler)",
    "trl-grpo": "TRL GRPOTrainer + PEFT (generate)",
}


def tokens_per_s(run: dict[str, Any], warmup: int) -> float:
    """Tokens of the steps after `warmup` over the time from the end of step `warmup` to the end of the last."""
    ends = run["ends"]
    return sum(run["tokens"][warmup : len(ends)]) / (ends[-1] - ends[warmup - 1])


def with_reference_pass(run: dict[str, Any], a: argparse.Namespace) -> float:
    """Tokens/s with the one-off reference pass charged to the counted steps: its time per row x their rows."""
    ends, counted = run["ends"], len(run["ends"]) - a.warmup
    charged = run.get("precompute_s", 0.0) * counted * a.batch / a.pairs
    return sum(run["tokens"][a.warmup : len(ends)]) / (ends[-1] - ends[a.warmup - 1] + charged)


def step_s(run: dict[str, Any], warmup: int) -> float:
    """The median time of one step after `warmup`."""
    ends = run["ends"][warmup - 1 :]
    return statistics.median(b - a for a, b in zip(ends, ends[1:], strict=False))


def paired(xs: list[float], ys: list[float]) -> float:
    """The median of same-repetition ratios x_i / y_i."""
    return statistics.median(x / y for x, y in zip(xs, ys, strict=True))


def judged(rows: list[tuple[str, float, bool]]) -> str:
    return harness.table(
        ["target", "measured", ""], [[t, f"{v:.2f}", "met" if ok else "**missed**"] for t, v, ok in rows]
    )


def dpo_section(a: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> tuple[str, list]:
    rates = {s: [tokens_per_s(r, a.warmup) for r in runs[s]] for s in DPO_SIDES}
    rss = {s: [r["rss"] for r in runs[s]] for s in DPO_SIDES}
    speed = paired(rates["lorakit-dpo"], rates["trl-dpo"])
    charged = {s: [with_reference_pass(r, a) for r in runs[s]] for s in DPO_SIDES}
    rows = []
    for s in DPO_SIDES:
        peak = harness.fmt_bytes(statistics.median(rss[s])) if rss[s][0] is not None else "not measured"
        pre = statistics.median(r.get("precompute_s", 0.0) for r in runs[s])
        cells = [f"{statistics.median(rates[s]):,.0f}", f"{statistics.median(charged[s]):,.0f}", peak]
        rows.append([NAMES[s], *cells, f"{pre:.2f} s" if pre else "— (in every step)"])
    targets = [("DPO training tokens/s ≥ 1.3× TRL's", speed, speed >= 1.3)]
    header = ["side", "tokens/s", "tokens/s, reference pass charged", "peak RSS", "reference pass before training"]
    text = harness.table(header, rows)
    whole = paired(charged["lorakit-dpo"], charged["trl-dpo"])
    text += (
        f"\n\nlorakit / TRL tokens/s (median of same-repetition ratios): {speed:.2f}× in the training loop, "
        f"{whole:.2f}× with lorakit's one-off reference pass charged to the counted steps (its time per row × "
        "their rows)."
    )
    if rss["lorakit-dpo"][0] is not None:
        ratio = paired([float(x) for x in rss["lorakit-dpo"]], [float(x) for x in rss["trl-dpo"]])
        targets.append(("DPO peak RSS ≤ TRL's (lorakit / TRL)", ratio, ratio <= 1.0))
        text += f" Peak RSS lorakit / TRL: {ratio:.2f}×."
    return text, targets


def grpo_section(
    a: argparse.Namespace, rates: dict[str, list[float]], runs: dict[str, list[dict[str, Any]]]
) -> tuple[str, list]:
    lk, trl = rates["lorakit EngineSampler"], rates["TRL generate"]
    speed = paired(lk, trl)
    roll = harness.table(
        ["sampler", "tokens/s", "noise"],
        [[n, f"{statistics.median(v):,.0f}", f"±{_spread(v):.0%}"] for n, v in rates.items()],
    )
    steps = {s: [step_s(r, a.warmup) for r in runs[s]] for s in GRPO_SIDES}
    ratio = paired(steps["lorakit-grpo"], steps["trl-grpo"])
    step_rows = [
        [NAMES[s], harness.fmt_time(statistics.median(steps[s])), f"{statistics.median(_lengths(runs[s])):.1f}"]
        for s in GRPO_SIDES
    ]
    text = (
        f"### Rollouts ({a.prompts} prompt(s) × G = {a.generations}, up to {a.new_tokens} new tokens; "
        f"{a.rounds} interleaved rounds)\n\n{roll}\n\nlorakit / TRL rollout tokens/s: {speed:.2f}× "
        "(median of same-round ratios).\n\n"
        f"### Whole step ({a.prompts} prompt(s) × G = {a.generations})\n\n"
        + harness.table(["side", "step (median)", "mean completion length"], step_rows)
        + f"\n\nlorakit / TRL step time: {ratio:.2f}× (median of same-repetition ratios)."
    )
    targets = [
        ("GRPO rollout tokens/s ≥ 3× TRL's", speed, speed >= 3.0),
        ("GRPO whole step ≤ 0.6× TRL's", ratio, ratio <= 0.6),
    ]
    return text, targets


def _spread(xs: list[float]) -> float:
    s = harness.Samples({"x": xs})
    return s.spread("x")


def _lengths(runs: list[dict[str, Any]]) -> list[float]:
    return [x for r in runs for x in r["mean_length"] if x == x] or [float("nan")]


def report(
    a: argparse.Namespace,
    rates: dict[str, list[float]],
    runs: dict[str, list[dict[str, Any]]],
    load_start: str,
    load_end: str,
    elapsed: float,
) -> str:
    """The whole page."""
    import trl

    dpo, dpo_targets = dpo_section(a, runs)
    grpo, grpo_targets = grpo_section(a, rates, runs)
    return f"""# Preference and RL fine-tuning with LoRA: lorakit against TRL + PEFT (CPU)

Command: `python benchmarks/preference.py{a.command}`
({elapsed:.0f} s)

Machine: {harness.machine("cpu", a.threads)}, trl {trl.__version__}. Load average at the start and end: \
{load_start} and {load_end} (a shared machine: other load widens the noise).

Model: Llama-style (transformers `LlamaForCausalLM` from a config, random seeded weights, fp32), hidden {a.hidden}, \
intermediate {a.intermediate}, {a.layers} layers, {a.heads} heads, vocab {a.vocab}, a WordLevel tokenizer; LoRA \
r={a.rank}, alpha={2 * a.rank}, dropout 0 on {", ".join(harness.TARGETS)}. Both sides: the same rows, lr {a.lr} \
(linear), fp32, no gradient checkpointing, {a.threads} torch thread(s); each library's defaults otherwise. Training \
sides run {a.reps} interleaved repetition(s), each in its own process; the first {a.warmup} step(s) of each are \
warm-up.

## Targets

{judged(dpo_targets + grpo_targets)}

## DPO ({a.pairs} pairs, batch {a.batch} pairs, {a.dpo_steps} steps, sigmoid loss, beta 0.1)

{dpo}

Tokens are the attention tokens of the chosen and rejected rows of the counted steps. lorakit computes the frozen
reference's log-probs of every row once, before training (timed apart above), and trains with one forward and
backward per step; TRL's default (`precompute_ref_log_probs=False`) runs the reference, its adapter disabled, in
every step as a second forward.

## GRPO (exact-match reward, beta 0, TRL's default loss "dapo")

{grpo}

TRL's rollouts are its `GRPOTrainer._generate_single_turn` on CPU: `generate` on the prompts left-padded, each
repeated G times, every row computed until the longest is done. lorakit's are the serving engine's continuous
batching (`EngineSampler`), KV cache, finished sequences leaving the batch. Tokens count each completion up to
and including its first EOS. A step is rollouts, rewards, the policy's log-probs, backward and AdamW.

Why the GRPO targets are missed: TRL's `generate` on CPU already decodes all B·G rows together with a KV cache (a
batch per step, not a call per completion), so the engine can only win on what is left. Profiled with py-spy on both
sides (`benchmarks/rollouts.py`, hidden 512): ~84% of each side's time is the model forward, with the same base-GEMM
sample counts; the engine spends ~9% more on its per-row float64 sampling and ~4% on the per-token text stream that
rollouts do not need. Continuous batching gains where completions end at different lengths; this random-weights
model runs almost every row to the 64-token limit (mean 63.5), and the step follows its rollouts. What would move
it: rollouts with the adapter merged into the weights for their duration (the way TRL + vLLM sample; the engine
refuses to run merged today), vectorised sampling, no text stream for rollouts.
"""
