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
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from scale_report import plot_curve, plot_loads, report  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 43 // 16,
        num_hidden_layers=a.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=a.vocab,
        max_position_embeddings=max(2048, seq),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(a.device)


def lora_pair(a, base):
    """(lorakit model, PEFT model): base wrapped both ways (lorakit in place, PEFT on a copy)."""
    import peft

    import lorakit as lk

    pm = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=TARGETS)
    )
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
        for n in ["lorakit", "PEFT"] if i % 2 else ["PEFT", "lorakit"]:
            fn, limit = loads[n]
            if i <= limit:  # memory: this load's own rise (the two libraries share the process)
                before = resident(a.device)
                out[n]["s"].append(harness.timed(lambda fn=fn, i=i: fn(i), a.device))
                out[n]["bytes"].append(out[n]["bytes"][-1] + resident(a.device) - before)
    assert len(lk.list_adapters(lkm)) == a.adapters + 1, lk.list_adapters(lkm)
    out["adapter_bytes"] = {
        "s": [],
        "bytes": [
            float(
                sum(p.numel() * p.element_size() for n, p in lkm.named_parameters() if "lora_" in n) / (a.adapters + 1)
            )
        ],
    }
    return out


# -- report and plots ------------------------------------------------------------------------------------------------


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
