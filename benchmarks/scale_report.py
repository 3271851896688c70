"""benchmarks/scale.py's figures and report: the curves, the load table and RESULTS-scale.md."""

from __future__ import annotations

import statistics
from pathlib import Path

import harness
from harness import table

LOAD_TARGET = 1.1  # lorakit's 256th load / its 1st


def near(xs: list[float], n: int, w: int = 5) -> float:
    """The median of loads n-w+1..n (1-based), or of the first w when n < w."""
    lo = max(0, n - w) if n >= w else 0
    return statistics.median(xs[lo : max(n, w)])


def plot_curve(rows, xlabel: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (t_ax, m_ax) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [x for x, _ in rows]
    for n, style in (("lorakit", "o-"), ("PEFT", "s--")):
        t_ax.plot(xs, [r[n]["step_s"] * 1e3 for _, r in rows], style, label=n)
        m_ax.plot(xs, [r[n]["peak"] / 2**20 for _, r in rows], style, label=n)
    for ax, y in ((t_ax, "training step (ms)"), (m_ax, "peak memory above rest (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log" if ax is t_ax else "linear")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(y)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_loads(loads, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (t_ax, m_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for n, style in (("lorakit", "-"), ("PEFT", "--")):
        s, b = loads[n]["s"], loads[n]["bytes"]
        t_ax.plot(range(1, len(s) + 1), [x * 1e3 for x in s], style, label=n, alpha=0.8)
        m_ax.plot(range(len(b)), [(x - b[0]) / 2**20 for x in b], style, label=n)
    t_ax.set_xlabel("adapters already loaded + 1 (the n-th load)")
    t_ax.set_ylabel("load time (ms)")
    m_ax.set_xlabel("adapters loaded")
    m_ax.set_ylabel("resident memory added (MiB)")
    for ax in (t_ax, m_ax):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("Loading adapters into one model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curve_table(rows, label: str) -> str:
    body = [
        [
            str(x),
            f"{r['lorakit']['step_s'] * 1e3:,.0f} ms",
            f"{r['PEFT']['step_s'] * 1e3:,.0f} ms",
            f"{r['lorakit']['ratio']:.2f}×",
            f"{r['lorakit']['peak'] / 2**20:,.0f} MiB",
            f"{r['PEFT']['peak'] / 2**20:,.0f} MiB",
        ]
        for x, r in rows
    ]
    return table([label, "lorakit step", "PEFT step", "lorakit / PEFT", "lorakit peak rise", "PEFT peak rise"], body)


def growth(rows, key: str) -> str:
    """How the lorakit value grows from the first point to the last, against the size."""
    (x0, r0), (x1, r1) = rows[0], rows[-1]
    if not r0["lorakit"][key]:
        return f"from 0 for ×{x1 / x0:g}"
    return f"×{r1['lorakit'][key] / r0['lorakit'][key]:.1f} for ×{x1 / x0:g}"


def load_table(loads, a) -> tuple[str, float]:
    lk, pf = loads["lorakit"]["s"], loads["PEFT"]["s"]
    marks = sorted({n for n in (1, 2, 4, 8, 16, 32, 35, 64, 128, 256, a.adapters, a.peft_adapters) if n <= a.adapters})
    body = [
        [
            str(n),
            f"{lk[n - 1] * 1e3:.1f} ms",
            f"{near(lk, n) * 1e3:.1f} ms",
            f"{pf[n - 1] * 1e3:.1f} ms" if n <= len(pf) else "—",
            f"{near(pf, n) * 1e3:.1f} ms" if n <= len(pf) else "—",
        ]
        for n in marks
    ]
    ratio = near(lk, a.adapters) / near(lk, 1)
    return table(["n-th load", "lorakit", "lorakit (median of 5)", "PEFT", "PEFT (median of 5)"], body), ratio


def report(a, seq_rows, hid_rows, loads, load_start: str, load_end: str, seconds: float) -> str:
    loads_md, ratio = load_table(loads, a)
    per = {n: (v["bytes"][-1] - v["bytes"][0]) / (len(v["bytes"]) - 1) for n, v in loads.items() if v["s"]}
    quick = " (--quick: tiny models; the numbers only show that the suite runs)" if a.quick else ""
    return "\n".join(
        [
            "# Scale curves: step time and memory vs sequence length and hidden size; adapter loads vs adapters held",
            "",
            f"Command: `python benchmarks/scale.py{a.command}`{quick}. Total {seconds:.0f} s.",
            "",
            f"Machine: {harness.machine(a.device, a.threads)}. Load average (1/5/15 min) at start {load_start}, at end "
            f"{load_end}: the machine is shared, every number here was taken under that load; cases interleave within "
            "each round and times are medians.",
            "",
            f"To keep the whole run near 5 minutes on 2 CPU cores: batch {a.seq_batch} on the sequence curve, batch 1 "
            f"at sequence {a.hidden_seq} on the hidden curve, {a.layers} layers, {a.rounds} measured rounds per point "
            f"after one warm-up round; PEFT loads stop at {a.peft_adapters} adapters (lorakit's go to {a.adapters}).",
            "",
            "A step is forward (the model's own causal-LM loss), backward and torch AdamW on the LoRA factors; "
            "peak rise = memory the step needs above what the process holds at rest (on CPU VmHWM − VmRSS, after "
            "glibc's malloc_trim(0) hands freed pages back and VmHWM is reset, before the measured step).",
            "",
            "## Targets",
            "",
            table(
                ["target", "goal", "measured", "verdict"],
                [
                    [
                        f"lorakit's {a.adapters}th adapter load / its 1st (medians of 5 loads)",
                        f"≤ {LOAD_TARGET}×",
                        f"{ratio:.2f}×",
                        "met" if ratio <= LOAD_TARGET else "**missed**",
                    ]
                ],
            ),
            "",
            f"## Sequence length (hidden {a.base_hidden}, batch {a.seq_batch})",
            "",
            f"![step time and memory vs sequence length]({a.plots}-seq.png)",
            "",
            curve_table(seq_rows, "sequence"),
            "",
            f"lorakit step time grows {growth(seq_rows, 'step_s')} in length, its peak "
            f"rise {growth(seq_rows, 'peak')}.",
            "",
            f"## Hidden size (sequence {a.hidden_seq}, batch 1, intermediate 2.6875× hidden, head dim 64)",
            "",
            f"![step time and memory vs hidden size]({a.plots}-hidden.png)",
            "",
            curve_table(hid_rows, "hidden"),
            "",
            f"lorakit step time grows {growth(hid_rows, 'step_s')} in hidden size, its peak rise "
            f"{growth(hid_rows, 'peak')}.",
            "",
            f"## Adapter loads into one model (hidden {a.base_hidden}, {a.layers} layers, r{a.rank} on 7 projections)",
            "",
            f"![load time and memory vs adapters loaded]({a.plots}-adapters.png)",
            "",
            "Load i reads its own saved copy of one adapter, under a new name (`lorakit.load_adapters(model, dir_i, "
            "name=f'a{i}')`, which checks the file's tensors against its lorakit.json; PEFT `model.load_adapter(dir_i, "
            "adapter_name=f'a{i}')`); the model starts with one adapter. Single loads "
            "are noisy on a shared machine, so each row also gives the median of the 5 "
            "loads ending there (of the first "
            "5, for the first rows). Memory: the rise of VmRSS across each load, summed per library (freed heap pages "
            "handed back first, by malloc_trim, so pages freed by the training steps above cannot hide it).",
            "",
            loads_md,
            "",
            table(
                ["", "lorakit", "PEFT"],
                [
                    ["resident memory per loaded adapter", *(f"{per[n] / 2**20:.2f} MiB" for n in ("lorakit", "PEFT"))],
                    [
                        "the adapter's own tensors (fp32 A and B)",
                        f"{loads['adapter_bytes']['bytes'][0] / 2**20:.2f} MiB",
                        "",
                    ],
                ],
            ),
            "",
        ]
    )
