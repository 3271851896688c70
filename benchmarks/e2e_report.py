"""benchmarks/e2e.py's report: RESULTS-e2e.md from the runs' measurements (one section per variant)."""

from __future__ import annotations

import statistics

import harness
from e2e_variants import NAMES
from harness import TARGETS, table

# (side, reference side, variants it is judged on or None for all, goal, "tokens/s" or "peak RSS")
GOALS = [
    ("lk", "hf", None, 1.3, "tokens/s"),
    ("lk", "hf-compile", None, 1.1, "tokens/s"),
    ("lk", "hf", ("vocab32k",), 0.8, "peak RSS"),
]
med = statistics.median


def tps(r: dict) -> float:
    return r["tokens"] / r["loop_s"]


def paired(run: dict, side: str, ref: str, what: str) -> list[float]:
    """Same-repetition ratios side / ref of tokens/s or peak RSS."""
    res = run["results"]
    f = tps if what == "tokens/s" else (lambda r: r["rss"])
    return [f(x) / f(y) for x, y in zip(res[side], res[ref], strict=True)]


def warmup_excess(a, r: dict) -> float:
    """What compiling (and first-call setup) cost, estimated: the Trainer's steps' times minus as many median
    steps (a recompile inside the counted steps included); lorakit's (logged every --log-every steps): the
    warm-up steps' time minus as many steady-state steps."""
    if "step_s" in r:
        return sum(r["step_s"]) - len(r["step_s"]) * statistics.median(r["step_s"])
    return r["warmup_s"] - a.log_every * r["loop_s"] / max(1, r["steps"] - a.log_every)


def compile_cell(a, key: str, v: list[dict]) -> str:
    """What the side reports of its compile: lorakit's metrics fields, the Trainer's dynamo records."""
    first = v[0]
    if key.startswith("lk"):
        if "compile_s" in first:
            recompiles = first.get("recompiles", "?")
            return f"{med(r['compile_s'] for r in v):.1f} s, {recompiles} recompiles (metrics.jsonl)"
        return "compiled, no compile_s in metrics" if first.get("compiled") else "eager (compile resolved off)"
    if "dynamo_frames" in first:
        return (
            f"dynamo {med(r['dynamo_compile_s'] for r in v):.1f} s fwd, {first['dynamo_frames']} frames compiled, "
            f"{first['graph_breaks']} graph breaks, {first['lengths']} batch lengths"
        )
    return "eager"


def side_rows(a, run: dict) -> list[list[str]]:
    rows, floors = [], run["floors"]
    for key, v in run["results"].items():
        floor = floors["lk" if key.startswith("lk") else "hf"]
        loop = med(r["loop_s"] for r in v)
        rows.append(
            [
                NAMES[key],
                f"{med(tps(r) for r in v):,.0f}",
                f"{loop:.2f} s",
                f"{med((r['steps'] - a.log_every) / r['loop_s'] for r in v):.3f}",
                f"{med(r['tokens'] for r in v):,.0f}",
                f"{med(r['rss'] for r in v) / 2**20:,.0f} MiB",
                f"{floor / 2**20:,.0f} MiB",
                f"{(med(r['rss'] for r in v) - floor) / 2**20:,.0f} MiB",
                f"{med(r['wall_s'] for r in v):.1f} s",
                f"{med(warmup_excess(a, r) for r in v):.1f} s (est.)",
                compile_cell(a, key, v),
                " / ".join(f"{tps(r):,.0f}" for r in v),
            ]
        )
    return rows


def ratio_rows(run: dict) -> list[list[str]]:
    res, rows = run["results"], []
    for ref in ("hf", "hf-compile"):
        if ref not in res:
            continue
        for key in res:
            if key == ref:
                continue
            speed, rss = paired(run, key, ref, "tokens/s"), paired(run, key, ref, "peak RSS")
            each = ", ".join(f"{x:.2f}" for x in speed)
            rows.append([f"{NAMES[key]} / {NAMES[ref]}", f"{med(speed):.2f}× ({each})", f"{med(rss):.2f}×"])
    return rows


def target_rows(runs: list[dict]) -> list[list[str]]:
    rows = []
    for side, ref, only, goal, what in GOALS:
        for run in runs:
            name = run["a"].name
            if only and name not in only:
                continue
            label = f"{name}: {what}, {NAMES[side]} / {NAMES[ref]}"
            sign = "≥" if what == "tokens/s" else "≤"
            if side not in run["results"] or ref not in run["results"]:
                rows.append([label, f"{sign} {goal}×", "—", "not run (side not in --sides)"])
                continue
            x = med(paired(run, side, ref, what))
            ok = x >= goal if what == "tokens/s" else x <= goal
            rows.append([label, f"{sign} {goal}×", f"{x:.2f}×", "met" if ok else "**missed**"])
    if not any(r[0].startswith("vocab32k") for r in rows):
        rows.append(["vocab32k: peak RSS, lorakit / Trainer + PEFT", "≤ 0.8×", "—", "not run (variant vocab32k)"])
    return rows


def setup_line(a) -> str:
    return (
        f"Llama-style model (hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers, {a.heads} heads, "
        f"vocab {a.vocab}, random seeded weights, {a.precision}); {a.rows} rows of "
        f"{max(2, a.max_length * 3 // 4)}–{a.max_length * 5 // 4} words (truncated to max length {a.max_length}, "
        f"+ EOS); batch {a.batch}; {a.steps} steps, the first {a.log_every} not counted; {a.reps} repetition(s)."
    )


def variant_section(a, run: dict) -> list[str]:
    va = run["a"]
    head = ["side", "tokens/s", "loop time", "steps/s", "tokens counted", "peak RSS", "import floor"]
    head += ["peak − floor", "wall", "warm-up excess", "compile", "tokens/s per repetition"]
    took = ", ".join(f"{NAMES[k]} {s / max(1, va.reps):.0f} s" for k, s in run["side_s"].items())
    return [
        f"## Variant {va.name}",
        "",
        setup_line(va),
        "",
        table(head, side_rows(va, run)),
        "",
        table(["ratio (same-repetition, median)", "tokens/s", "peak RSS"], ratio_rows(run)),
        "",
        f"Time: the variant took {run['seconds']:.0f} s; one repetition of each side (mean): {took}.",
        "",
    ]


def report(a, runs: list[dict], load_start: str, load_end: str, seconds: float) -> str:
    quick = " (--quick: a tiny model; these numbers only show that the suite runs)" if a.quick else ""
    lines = [
        "# End to end: `lorakit finetune` vs transformers Trainer + PEFT",
        "",
        f"Command: `python benchmarks/e2e.py{a.command}`{quick}. Total {seconds:.0f} s.",
        "",
        f"Machine: {harness.machine(a.device, a.threads)}. Load average (1/5/15 min) at start {load_start}, "
        f"at end {load_end}: the numbers were taken under that load; each side runs in its own fresh process, "
        "repetitions interleave in a rotating order, and ratios are medians of same-repetition ratios.",
        "",
        f"Common setup: LoRA r{a.rank} alpha{2 * a.rank} dropout 0 on {'/'.join(t[:-5] for t in TARGETS)}; lr "
        f"{a.lr} linear to 0, AdamW (torch, weight decay 0), clip 1.0; no evaluation or checkpoint during the loop; "
        f"{a.threads} thread(s) per side; device {a.device}. `lorakit finetune` runs with its defaults "
        "(--loss/--fuse/--compile auto) unless the side names a flag; the Trainer side is get_peft_model + "
        "Trainer(TrainingArguments(optim='adamw_torch', save_strategy='no', ...)) + DataCollatorForLanguageModeling.",
        "",
        "## Targets",
        "",
        table(["target", "goal", "measured (median)", "verdict"], target_rows(runs)),
        "",
        "Columns: tokens/s = real (attention-mask) tokens of the counted steps / their loop time. Peak RSS = the "
        "side's whole process (ru_maxrss from wait4). Import floor = peak RSS of a process that only imports what "
        "the side imports before it loads a model. Warm-up excess = an estimate of compile time on a compiled side "
        "(the first-call setup on an eager one): Trainer, every step's time minus as many median steps (a recompile "
        "for a new batch length inside the counted steps included: it also slows that side's tokens/s, as it would a "
        "user's run); lorakit, the first counted-out steps' time minus as many steady-state steps. "
        "Compile = what the side records: lorakit's `compile_s`/`recompiles` in metrics.jsonl, the Trainer's "
        "torch._dynamo records (forward compile time; the backward compiles lazily inside the first step, so the "
        "estimate is the fuller figure); transformers compiles the whole PeftModel (accelerate's "
        "TorchDynamoPlugin, dynamic=None: a second batch length recompiles it with dynamic shapes).",
        "",
    ]
    for run in runs:
        lines += variant_section(a, run)
    return "\n".join(lines)
