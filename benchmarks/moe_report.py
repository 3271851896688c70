"""benchmarks/moe.py's report: RESULTS-moe.md from its measurements."""

from __future__ import annotations

import os
import shlex

import harness
from harness import fmt_bytes, fmt_time, table


def command_flags(argv: list[str]) -> list[str]:
    """The command line without --out (and its value): the figures do not depend on where they were written."""
    out, skip = [], False
    for x in argv:
        if skip or x.startswith("--out="):
            skip = False
            continue
        if x == "--out":
            skip = True
            continue
        out.append(x)
    return out


def header(a, base, seconds: float) -> list[str]:
    cfg = base.config
    impl = getattr(cfg, "_experts_implementation", None) or "transformers' default"
    flags = shlex.join(command_flags(a.argv))
    return [
        "# LoRA on mixture-of-experts weights: lorakit vs PEFT `target_parameters` vs the frozen bound",
        "",
        f"Command: `python benchmarks/moe.py{' ' + flags if flags else ''}` ({seconds:.0f} s)",
        "",
        f"Machine: {harness.machine('cpu', a.threads)}. Load average (1 min) at the start and end: "
        f"{a.load_start:.2f} and {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (a shared machine: other load "
        "widens the noise column).",
        "",
        f"Model: Qwen3-MoE (transformers `Qwen3MoeForCausalLM` from a config, random weights, fp32), hidden "
        f"{cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_experts} experts of intermediate size "
        f"{cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok} routing, {cfg.num_attention_heads} heads, "
        f"vocab {cfg.vocab_size}; experts kernel: {impl}. LoRA r={a.rank}, alpha={2 * a.rank}, dropout 0 on "
        "q_proj, k_proj, v_proj, o_proj (modules) and on mlp.experts.gate_up_proj, mlp.experts.down_proj (3-D "
        f"parameters, a rank-{a.rank} pair per expert); batch {a.batch} × {a.seq} = {a.batch * a.seq} tokens. "
        f"{a.rounds} interleaved rounds; times are medians, ratios medians of same-round ratios, ± half the "
        "inter-quartile range.",
        "",
    ]


def targets(train, rss) -> list[list[str]]:
    rows = []

    def judge(what: str, value: float, limit: float) -> None:
        rows.append([what, f"{value:.3f}", "met" if value <= limit else "**missed**"])

    names = train.times.keys()
    if {"lorakit", "frozen bound"} <= names:
        judge("training step ≤ 1.15× frozen bound", train.ratio("lorakit", "frozen bound"), 1.15)
    if {"lorakit", "PEFT"} <= names:
        judge("training step ≤ 0.7× PEFT's", train.ratio("lorakit", "PEFT"), 0.7)
        if rss is not None:
            judge("peak memory ≤ PEFT's (lorakit / PEFT)", rss["lorakit"]["peak"] / rss["PEFT"]["peak"], 1.0)
    return rows


def training(train, rss, counts) -> list[str]:
    names = list(train.times)
    ref = "frozen bound" if "frozen bound" in names else None
    header_row = ["case", "step (median)", "× frozen bound", "× PEFT", "noise", "trainable parameters"]
    if rss is not None:
        header_row += ["peak RSS", "peak − RSS before the step"]
    rows = []
    for n in names:
        row = [
            n,
            fmt_time(train.median(n)),
            f"{train.ratio(n, ref):.3f}×" if ref else "—",
            f"{train.ratio(n, 'PEFT'):.3f}×" if "PEFT" in names else "—",
            f"±{train.spread(n):.0%}",
            f"{counts[n]:,}",
        ]
        if rss is not None:
            row += [fmt_bytes(rss[n]["peak"]), fmt_bytes(rss[n]["peak"] - rss[n]["before"])]
        rows.append(row)
    return [
        "## Training step (forward + backward + AdamW)",
        "",
        table(header_row, rows),
        "",
        "Each case back-propagates from the loss to the token embeddings (an input that requires grad), so all "
        "cover the same activations; the frozen bound trains nothing. Peak RSS: each case in a fresh process "
        "(VmHWM reset after building the model, peak over two steps); every process holds the same base weights "
        "twice (the base and the case's copy), so differences between rows are the cases' own.",
        "",
    ]


def profile(prof) -> list[str]:
    if not prof:
        return []
    rows = [[f"`{op}`", f"{mine:.1f}", f"{ref:.1f}", f"{mine - ref:+.1f}"] for op, mine, ref in prof]
    extra = sum(mine - ref for _, mine, ref in prof)
    return [
        "### Where lorakit's extra time goes (torch.profiler)",
        "",
        f"One step of lorakit against one of the frozen bound (self CPU ms per op, largest differences; these "
        f"{len(prof)} ops account for {extra:+.0f} ms):",
        "",
        table(["op", "lorakit", "frozen bound", "difference"], rows),
        "",
    ]


def qlora(train, rss, sizes) -> list[str]:
    if sizes is None:
        return []
    fp32, nf4 = sizes
    lines = [
        "## QLoRA: NF4 expert weights",
        "",
        f'`quantize_base(model, "nf4")` after `apply_lora` (the `lorakit NF4` row above): the adapted expert '
        f"weights take {fmt_bytes(nf4)} as NF4 against {fmt_bytes(fp32)} in fp32 ({nf4 / fp32:.3f}×; 4-bit codes, "
        "one scale per 64 weights, double-quantised), each expert stored apart and decoded only when tokens are "
        "routed to it. The attention projections are NF4 too.",
    ]
    if "lorakit" in train.times:
        lines.append(f"Step time: {train.ratio('lorakit NF4', 'lorakit'):.3f}× lorakit's in fp32.")
    if rss is not None and "lorakit" in rss:
        n, f = rss["lorakit NF4"]["peak"], rss["lorakit"]["peak"]
        lines.append(f"Peak RSS: {fmt_bytes(n)} against {fmt_bytes(f)} ({n / f:.3f}×).")
    return [*lines, ""]


def report(a, base, train, rss, counts, diff, prof, sizes, seconds: float) -> str:
    """RESULTS-moe.md: targets, the training table, the profile and the sanity figures."""
    lines = header(a, base, seconds)
    judged = targets(train, rss)
    if judged:
        lines += ["## Targets", "", table(["target", "measured", ""], judged), ""]
    lines += training(train, rss, counts)
    lines += profile(prof)
    lines += qlora(train, rss, sizes)
    if diff is not None:
        lines += [
            "## Agreement",
            "",
            f"lorakit vs PEFT, the same factors, before any step: max |logit difference| {diff:.2e}.",
            "",
        ]
    return "\n".join(lines)
