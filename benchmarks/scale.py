"""Scale curves: how cost grows as work grows; writes RESULTS-scale.md and scale-*.png beside it.

    .venv/bin/python benchmarks/scale.py                 # about 5 minutes on 2 CPU cores
    .venv/bin/python benchmarks/scale.py --quick --out /tmp/s.md   # a tiny model, seconds (the test uses this)
    .venv/bin/python benchmarks/scale.py --device cuda

Three curves, lorakit and PEFT side by side (same base weights, LoRA r8 on all seven projections):
  * a training step (forward, backward, AdamW) and its peak memory vs sequence length, at the benchmark model;
  * the same vs hidden size (intermediate 2.6875x hidden, head dim 64, 4 layers);
  * adapter load time vs how many adapters the model already holds (lorakit.load_adapters(..., name=) and
    PEFT's load_adapter, loads interleaved), and the memory each loaded adapter costs.
Step times are medians over interleaved rounds (the case order rotates). Peak memory on CPU is the rise of
VmHWM over the resting VmRSS during one measured step (VmHWM reset through /proc/self/clear_refs first); on
CUDA, max_memory_allocated over memory_allocated.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import table  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOAD_TARGET = 1.1  # lorakit's 256th load / its 1st


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", default="128,256,512,1024,2048", help="sequence lengths of the first curve")
    p.add_argument("--seq-batch", type=int, default=1, help="batch size of the sequence-length curve")
    p.add_argument("--hiddens", default="512,1024,1536,2048", help="hidden sizes of the second curve")
    p.add_argument("--hidden-seq", type=int, default=256, help="sequence length of the hidden-size curve")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per point (after one warm-up round)")
    p.add_argument("--adapters", type=int, default=256, help="lorakit adapters loaded into one model")
    p.add_argument("--peft-adapters", type=int, default=64, help="PEFT adapters loaded (its loads grow slower)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny models, few points (for tests)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS-scale.md")
    p.add_argument("--plots", default="scale", help="the plots are PLOTS-seq.png, -hidden.png, -adapters.png by --out")
    a = p.parse_args(argv)
    a.command = "".join(f" {x}" for x in (sys.argv[1:] if argv is None else argv) if not x.startswith("--hf-side"))
    a.seqs, a.hiddens = [int(x) for x in a.seqs.split(",")], [int(x) for x in a.hiddens.split(",")]
    a.base_hidden = 512
    if a.quick:
        a.seqs, a.hiddens, a.base_hidden, a.layers, a.vocab = [16, 32], [32, 64], 32, 2, 128
        a.hidden_seq, a.rounds, a.adapters, a.peft_adapters = 16, 1, 12, 6
    return a


def build_base(a, hidden: int, seq: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 43 // 16, num_hidden_layers=a.layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=a.vocab,
                      max_position_embeddings=max(2048, seq), tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(a.device)


def lora_pair(a, base):
    """(lorakit model, PEFT model): base wrapped both ways (lorakit in place, PEFT on a copy)."""
    import peft

    import lorakit as lk

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank,
                                                                  target_modules=TARGETS))
    return lk.apply_lora(base, lk.LoraConfig(rank=a.rank, alpha=2.0 * a.rank), TARGETS), pm


def train_step(model, ids):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1]) * 1024


def trim() -> None:
    """glibc's malloc_trim(0): return every free heap page to the OS (elsewhere: nothing to do)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_rise(step, device: str) -> int:
    """Bytes the step needs above what the process holds at rest (see the module docstring)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    gc.collect()
    trim()  # hand the allocator's free pages back first: else an earlier step's freed pages hide this one's need
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    step()
    return _status("VmHWM") - before


def point(a, hidden: int, seq: int, batch: int) -> dict[str, dict[str, float]]:
    """Median step seconds and peak rise (bytes) of lorakit and PEFT at one size."""
    lkm, pm = lora_pair(a, build_base(a, hidden, seq))
    ids = torch.randint(0, a.vocab, (batch, seq), generator=torch.Generator().manual_seed(2)).to(a.device)
    steps = {"lorakit": train_step(lkm.train(), ids), "PEFT": train_step(pm.train(), ids)}
    s = harness.interleaved(steps, rounds=a.rounds, warmup=1, device=a.device)
    out = {n: {"step_s": s.median(n), "peak": float(peak_rise(steps[n], a.device))} for n in steps}
    out["lorakit"]["ratio"] = s.ratio("lorakit", "PEFT")
    return out


def curve(a, name: str, xs: list[int], at) -> list[tuple[int, dict]]:
    rows = []
    for x in xs:
        t = time.perf_counter()
        rows.append((x, point(a, *at(x))))
        gc.collect()  # the point's models (PEFT's hold reference cycles) go before the next, larger ones
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(f"{name} {x}: {rows[-1][1]} ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    return rows


# -- adapter loading ---------------------------------------------------------------------------------------------


def resident(device: str) -> int:
    """Bytes held now: CUDA memory allocated, or VmRSS after freed heap pages go back (see `trim`)."""
    if not device.startswith("cuda"):
        trim()
    return torch.cuda.memory_allocated() if device.startswith("cuda") else _status("VmRSS")


def load_curve(a, tmp: Path) -> dict[str, dict[str, list[float]]]:
    """Per-load seconds and resident bytes after each load, lorakit to --adapters, PEFT to --peft-adapters."""
    import lorakit as lk

    lkm, pm = lora_pair(a, build_base(a, a.base_hidden, 64))
    # each load reads its own adapter directory, as a server loading many adapters does (lorakit checks every new
    # file's tensors against lorakit.json; re-reading one directory would measure its cached verification instead)
    for i in range(1, max(a.adapters, a.peft_adapters) + 1):
        if i <= a.adapters:
            lk.save_adapters(lkm, tmp / f"lk{i}")
        if i <= a.peft_adapters:
            pm.save_pretrained(str(tmp / f"pf{i}"))
    gc.collect()

    def lk_load(i: int) -> None:
        lk.load_adapters(lkm, tmp / f"lk{i}", name=f"a{i}")

    def pf_load(i: int) -> None:
        pm.load_adapter(str(tmp / f"pf{i}"), adapter_name=f"a{i}")

    out: dict[str, dict[str, list[float]]] = {n: {"s": [], "bytes": [0.0]} for n in ("lorakit", "PEFT")}
    loads = {"lorakit": (lk_load, a.adapters), "PEFT": (pf_load, a.peft_adapters)}
    for i in range(1, max(a.adapters, a.peft_adapters) + 1):
        for n in (["lorakit", "PEFT"] if i % 2 else ["PEFT", "lorakit"]):
            fn, limit = loads[n]
            if i <= limit:  # memory: this load's own rise (the two libraries share the process)
                before = resident(a.device)
                out[n]["s"].append(harness.timed(lambda fn=fn, i=i: fn(i), a.device))
                out[n]["bytes"].append(out[n]["bytes"][-1] + resident(a.device) - before)
    assert len(lk.list_adapters(lkm)) == a.adapters + 1, lk.list_adapters(lkm)
    out["adapter_bytes"] = {"s": [], "bytes": [float(sum(p.numel() * p.element_size() for n, p in
                                                         lkm.named_parameters() if "lora_" in n) / (a.adapters + 1))]}
    return out


def near(xs: list[float], n: int, w: int = 5) -> float:
    """The median of loads n-w+1..n (1-based), or of the first w when n < w."""
    lo = max(0, n - w) if n >= w else 0
    return statistics.median(xs[lo : max(n, w)])


# -- report and plots ------------------------------------------------------------------------------------------------


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
    body = [[str(x), f"{r['lorakit']['step_s'] * 1e3:,.0f} ms", f"{r['PEFT']['step_s'] * 1e3:,.0f} ms",
             f"{r['lorakit']['ratio']:.2f}×", f"{r['lorakit']['peak'] / 2**20:,.0f} MiB",
             f"{r['PEFT']['peak'] / 2**20:,.0f} MiB"] for x, r in rows]
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
    body = [[str(n), f"{lk[n - 1] * 1e3:.1f} ms", f"{near(lk, n) * 1e3:.1f} ms",
             f"{pf[n - 1] * 1e3:.1f} ms" if n <= len(pf) else "—",
             f"{near(pf, n) * 1e3:.1f} ms" if n <= len(pf) else "—"] for n in marks]
    ratio = near(lk, a.adapters) / near(lk, 1)
    return table(["n-th load", "lorakit", "lorakit (median of 5)", "PEFT", "PEFT (median of 5)"],
                 body), ratio


def report(a, seq_rows, hid_rows, loads, load_start: str, load_end: str, seconds: float) -> str:
    loads_md, ratio = load_table(loads, a)
    per = {n: (v["bytes"][-1] - v["bytes"][0]) / (len(v["bytes"]) - 1) for n, v in loads.items() if v["s"]}
    quick = " (--quick: tiny models; the numbers only show that the suite runs)" if a.quick else ""
    return "\n".join([
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
        table(["target", "goal", "measured", "verdict"], [[
            f"lorakit's {a.adapters}th adapter load / its 1st (medians of 5 loads)", f"≤ {LOAD_TARGET}×",
            f"{ratio:.2f}×", "met" if ratio <= LOAD_TARGET else "**missed**"]]),
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
        table(["", "lorakit", "PEFT"], [
            ["resident memory per loaded adapter", *(f"{per[n] / 2**20:.2f} MiB" for n in ("lorakit", "PEFT"))],
            ["the adapter's own tensors (fp32 A and B)", f"{loads['adapter_bytes']['bytes'][0] / 2**20:.2f} MiB", ""],
        ]),
        "",
    ])


def main(argv: list[str] | None = None) -> Path:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    load_start, t0 = harness.loadavg(), time.perf_counter()
    seq_rows = curve(a, "seq", a.seqs, lambda s: (a.base_hidden, s, a.seq_batch))
    hid_rows = curve(a, "hidden", a.hiddens, lambda h: (h, a.hidden_seq, 1))
    with tempfile.TemporaryDirectory(prefix="lorakit-scale-") as tmp:
        t = time.perf_counter()
        loads = load_curve(a, Path(tmp))
        print(f"loads: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    out = a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    seq_title = f"hidden {a.base_hidden}, batch {a.seq_batch}"
    plot_curve(seq_rows, "sequence length", out.parent / f"{a.plots}-seq.png", seq_title)
    plot_curve(hid_rows, "hidden size", out.parent / f"{a.plots}-hidden.png", f"sequence {a.hidden_seq}, batch 1")
    plot_loads(loads, out.parent / f"{a.plots}-adapters.png")
    text = report(a, seq_rows, hid_rows, loads, load_start, harness.loadavg(), time.perf_counter() - t0)
    out.write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
