"""lorakit vs PEFT vs the cost floor, side by side, in one process: writes benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/run.py                # the default model (about 5 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/run.py --quick --out /tmp/r.md   # a tiny model, seconds (the test uses this)
    .venv/bin/python benchmarks/run.py --device cuda --threads 8

Model: a Llama-style transformers model built from a config (random weights, seeded), LoRA on all seven
projections. lorakit and PEFT get the same base weights, the same A/B and the same inputs; every case runs
once per round, rounds interleave and rotate, and ratios are medians of same-round ratios.

Fairness of the frozen bound: the three LoRA-shaped training cases (lorakit, PEFT, frozen) take the token
embeddings as an input that requires grad, so all three back-propagate through exactly the same
activations down to layer 0; a LoRA step then differs from the frozen step only by its LoRA branches
(with token ids as input a LoRA step would skip layer 0's q/k/v input gradients, which would flatter it).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import fmt_bytes, fmt_time, table  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HERE = Path(__file__).resolve().parent


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The benchmark model's size and LoRA rank (the Llama-style default of the issue), shared by every suite."""
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--rank", type=int, default=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.1, help="the non-zero dropout case")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 matches the issue's numbers)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds of the training cases")
    p.add_argument("--fast-rounds", type=int, default=15, help="rounds of inference and adapter cases")
    p.add_argument("--no-rss", action="store_true", help="skip the per-case peak-RSS subprocesses")
    p.add_argument("--quick", action="store_true", help="a tiny model and few rounds (for tests)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--rss-case", help=argparse.SUPPRESS)  # internal: one case's peak RSS, in a fresh process
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if a.quick:
        a.hidden, a.intermediate, a.layers, a.heads, a.vocab, a.batch, a.seq = 32, 64, 2, 2, 128, 2, 16
        a.rounds, a.fast_rounds, a.no_rss = 3, 3, True
    return a


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


# -- models -------------------------------------------------------------------------------------------

def build_base(a: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.heads, vocab_size=a.vocab,
                      max_position_embeddings=max(2048, a.seq), tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(a.device)


def build_lorakit(a, base, dropout: float):
    import lorakit as lk

    model = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=a.rank, alpha=2.0 * a.rank, dropout=dropout),
                          TARGETS)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init; give it values so outputs and gradients really flow through it
        for layer in lk.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
    return model


def build_peft(a, base, lorakit_model, dropout: float):
    """PEFT on a copy of the same base, with lorakit_model's A and B copied in."""
    import peft

    import lorakit as lk

    cfg = peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=dropout, target_modules=TARGETS)
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, layer in lk.lora_layers(lorakit_model).items():
            pl = model.base_model.model.get_submodule(name)
            pl.lora_A["default"].weight.copy_(layer.lora_A)
            pl.lora_B["default"].weight.copy_(layer.lora_B)
    return model


def frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def inputs(a):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(a.device)
    return ids, ids.clone()  # labels: HF shifts them inside the loss


class TrainCase:
    """One training step: forward with embeddings that require grad, backward, AdamW on what trains.

    Every case steps the optimizer lorakit's trainer builds (`lorakit.train.schedule.adamw`: torch's fused
    AdamW), PEFT and full fine-tuning included, so the cases differ only by the model.
    """

    def __init__(self, model, embed, ids, labels, use_ids: bool = False):
        from lorakit.train.schedule import adamw

        self.model, self.embed, self.ids, self.labels, self.use_ids = model.train(), embed, ids, labels, use_ids
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = adamw([{"params": params}], 1e-4, (0.9, 0.999), 0.01) if params else None

    def forward(self):
        if self.use_ids:
            return self.model(input_ids=self.ids, labels=self.labels).loss
        x = self.embed(self.ids).detach().requires_grad_(True)  # (B, T, d): the graph starts at layer 0
        return self.model(inputs_embeds=x, labels=self.labels).loss

    def __call__(self):
        self.forward().backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def train_cases(a, base):
    """{name: TrainCase} for both dropouts; the frozen bound and full fine-tuning once."""
    ids, labels = inputs(a)
    embed = base.get_input_embeddings()
    cases = {}
    for p in (0.0, a.dropout):
        lkm = build_lorakit(a, base, p)
        cases[f"lorakit p={p:g}"] = TrainCase(lkm, embed, ids, labels)
        cases[f"PEFT p={p:g}"] = TrainCase(build_peft(a, base, lkm, p), embed, ids, labels)
    cases["frozen bound"] = TrainCase(frozen(copy.deepcopy(base)), embed, ids, labels)
    full = copy.deepcopy(base)
    for prm in full.parameters():
        prm.requires_grad_(True)
    cases["full fine-tuning"] = TrainCase(full, embed, ids, labels, use_ids=True)
    return cases


# -- measurements -------------------------------------------------------------------------------------

def saved_bytes(case: TrainCase) -> int:
    """Bytes of distinct storages saved for backward by one forward (parameters excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in case.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = case.forward()
    del loss
    return sum(seen.values())


def rss_case(a, name: str) -> dict:
    """In a fresh process: RSS before a training step and the peak over two steps (bytes)."""
    base = build_base(a)
    cases = {k: v for k, v in train_cases(a, base).items() if k == name}
    case = cases[name]
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        case(), case()
        return {"before": before, "peak": torch.cuda.max_memory_allocated()}
    before = _rss("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM so the build's peak does not count
        peak_key = "VmHWM"
    except OSError:
        peak_key = None
    case(), case()
    peak = _rss(peak_key) if peak_key else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"before": before, "peak": peak}


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def peak_rss(a, names: list[str]) -> dict[str, dict]:
    flags = [f"--hidden={a.hidden}", f"--intermediate={a.intermediate}", f"--layers={a.layers}",
             f"--heads={a.heads}", f"--vocab={a.vocab}", f"--rank={a.rank}", f"--batch={a.batch}",
             f"--seq={a.seq}", f"--dropout={a.dropout}", f"--threads={a.threads}", f"--device={a.device}"]
    out = {}
    for n in names:
        r = subprocess.run([sys.executable, __file__, *flags, "--rss-case", n], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"peak-RSS subprocess for {n!r} failed:\n{r.stderr[-2000:]}")
        out[n] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def inference_cases(a, base, lorakit_model, peft_model):
    import lorakit as lk

    ids, _ = inputs(a)
    merged = lk.merge(copy.deepcopy(lorakit_model)).eval()
    models = {"base": base.eval(), "lorakit unmerged": lorakit_model, "PEFT unmerged": peft_model, "merged": merged}

    def run(m):
        def f():
            m.eval()
            with torch.no_grad():
                m(input_ids=ids)
        return f

    with torch.no_grad():  # sanity: the same numbers from every path
        diffs = {"lorakit unmerged vs merged":
                 (lorakit_model.eval()(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()}
    return {n: run(m) for n, m in models.items()}, diffs


def adapter_ops(a, base, lorakit_model, peft_model, tmp: Path) -> dict[str, dict[str, float]]:
    """Median seconds of save, load, hot swap, merge, unmerge for lorakit and PEFT (same tensors)."""
    import peft
    from peft.utils.hotswap import hotswap_adapter

    import lorakit as lk
    from lorakit.fingerprint import Fingerprints

    lkm, pm = lorakit_model.eval(), peft_model.eval()
    kept = Fingerprints()  # what a server or a swapping loop keeps beside its base: the base is hashed once
    lk_dirs, pf_dirs = [tmp / "lk_a", tmp / "lk_b"], [tmp / "pf_a", tmp / "pf_b"]
    lk.save_adapters(lkm, lk_dirs[0])
    pm.save_pretrained(pf_dirs[0])
    with torch.no_grad():  # a second adapter with other values, for swaps
        for layer in lk.lora_layers(lkm).values():
            layer.lora_B.mul_(-1.0)
        for m in pm.modules():
            if isinstance(m, peft.tuners.lora.LoraLayer):
                m.lora_B["default"].weight.mul_(-1.0)
    lk.save_adapters(lkm, lk_dirs[1])
    pm.save_pretrained(pf_dirs[1])
    # A served adapter was saved before it is swapped in. lorakit hashes a file's tensors on every load while the
    # file is under 2 s old (its stamp cannot vouch for it yet: docs/provenance.md), so the swaps start after that;
    # "load into a fresh base" still hashes everything (a new model has verified nothing, and keeps no Fingerprints).
    time.sleep(max(0.0, 2.1 - (time.time() - (lk_dirs[1] / "adapter_model.safetensors").stat().st_mtime)))
    state = {"i": 0, "fresh": None, "extra": None}

    def fresh():
        state["fresh"] = copy.deepcopy(base)

    def nxt():
        state["i"] += 1
        return state["i"] % 2

    def peft_swap():
        name = f"swap{state['i']}"
        i = nxt()
        pm.load_adapter(str(pf_dirs[i]), adapter_name=name)
        pm.set_adapter(name)
        state["extra"] = name

    def peft_swap_cleanup():
        if state["extra"] is not None:
            pm.set_adapter("default")
            pm.delete_adapter(state["extra"])
            state["extra"] = None

    cases = {
        "save: lorakit": lambda: lk.save_adapters(lkm, tmp / "lk_save"),
        "save: PEFT": lambda: pm.save_pretrained(tmp / "pf_save"),
        "load into a fresh base: lorakit": lambda: lk.load_adapters(state["fresh"], lk_dirs[0]),
        "load into a fresh base: PEFT": lambda: peft.PeftModel.from_pretrained(state["fresh"], str(pf_dirs[0])),
        "load-and-activate (hot swap): lorakit": lambda: lk.load_adapters(lkm, lk_dirs[nxt()], fingerprints=kept),
        "load-and-activate (hot swap): PEFT": peft_swap,
        "load-and-activate (hot swap): PEFT hotswap_adapter": lambda: hotswap_adapter(
            pm, str(pf_dirs[nxt()]), "default"
        ),
    }
    setup = {"load into a fresh base: lorakit": fresh, "load into a fresh base: PEFT": fresh,
             "load-and-activate (hot swap): PEFT": peft_swap_cleanup}
    s = harness.interleaved(cases, a.fast_rounds, 1, a.device, setup)
    peft_swap_cleanup()
    out = {n: s.median(n) for n in cases}
    # merge/unmerge in place (reversible) must alternate, so pair them by hand
    times = {k: [] for k in ("merge: lorakit", "unmerge: lorakit", "merge: PEFT", "unmerge: PEFT")}
    for r in range(a.fast_rounds + 1):
        order = [("lorakit", lambda: lk.merge_(lkm), lambda: lk.unmerge_(lkm)),
                 ("PEFT", pm.merge_adapter, pm.unmerge_adapter)]
        for lib, merge, unmerge in order if r % 2 else order[::-1]:
            tm, tu = harness.timed(merge, a.device), harness.timed(unmerge, a.device)
            if r:  # round 0 is warm-up
                times[f"merge: {lib}"].append(tm)
                times[f"unmerge: {lib}"].append(tu)
    out.update({k: harness.Samples(times).median(k) for k in times})
    return out


def profile_delta(cases: dict, name: str, ref: str, top: int = 8) -> list[tuple[str, float, float]]:
    """Self-CPU milliseconds per op in one step of `name` and of `ref`, largest differences first."""
    from torch.profiler import ProfilerActivity, profile

    per = {}
    for n in (name, ref):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            cases[n]()
        per[n] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    keys = set(per[name]) | set(per[ref])
    rows = [(k, per[name].get(k, 0.0), per[ref].get(k, 0.0)) for k in keys]
    return sorted(rows, key=lambda r: r[2] - r[1])[:top]


# -- the run ------------------------------------------------------------------------------------------

def log(*m: object) -> None:
    """Progress on stderr (stdout carries --rss-case's JSON)."""
    print(*m, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> Path | None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.rss_case:
        print(json.dumps(rss_case(a, a.rss_case)))
        return None
    t0 = time.perf_counter()
    a.load_start = os.getloadavg()[0]
    base = build_base(a)
    cases = train_cases(a, base)
    p = f"{a.dropout:g}"

    ids, _ = inputs(a)
    with torch.no_grad():  # sanity before any step: AdamW amplifies rounding differences between the two
        lkm, pm = cases["lorakit p=0"].model.eval(), cases["PEFT p=0"].model.eval()
        diff0 = (lkm(input_ids=ids).logits - pm(input_ids=ids).logits).abs().max().item()
        lkm.train(), pm.train()
    log(f"training steps: {a.rounds} rounds of {len(cases)} cases")
    train = harness.interleaved(cases, a.rounds, 1, a.device)

    prof = {n: profile_delta(cases, n, "frozen bound") for n in ("lorakit p=0", f"lorakit p={p}")}

    log("bytes saved for backward")
    saved = {n: saved_bytes(c) for n, c in cases.items()}
    rss = None if a.no_rss else peak_rss(a, list(cases))

    log("inference")
    lk0, pf0 = cases["lorakit p=0"].model, cases["PEFT p=0"].model
    inf_cases, diffs = inference_cases(a, base, lk0, pf0)
    diffs = {"lorakit vs PEFT (same factors, before training)": diff0, **diffs}
    inf = harness.interleaved(inf_cases, a.fast_rounds, 1, a.device)

    log("adapter operations")
    with tempfile.TemporaryDirectory() as tmp:
        ops = adapter_ops(a, base, lk0, pf0, Path(tmp))

    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(report(a, train, saved, rss, inf, ops, diffs, prof, time.perf_counter() - t0))
    log(f"wrote {a.out} in {time.perf_counter() - t0:.0f} s")
    return a.out


def report(a, train, saved, rss, inf, ops, diffs, prof, seconds) -> str:
    p = f"{a.dropout:g}"
    fb = "frozen bound"
    rows = [[n, fmt_time(train.median(n)), f"{train.ratio(n, fb):.3f}×", f"±{100 * train.spread(n):.0f}%"]
            for n in train.times]
    lora_bytes = {n: saved[n] - saved[fb] for n in saved if n not in (fb, "full fine-tuning")}
    mem_rows = []
    for n in saved:
        lb = lora_bytes.get(n)
        peft_name = n.replace("lorakit", "PEFT")
        vs = f"{lb / lora_bytes[peft_name]:.2f}×" if n.startswith("lorakit") and lora_bytes.get(peft_name) else ""
        r = rss[n] if rss else None
        mem_rows.append([n, fmt_bytes(saved[n]), fmt_bytes(lb) if lb is not None else "", vs,
                         fmt_bytes(r["peak"]) if r else "—", fmt_bytes(r["peak"] - r["before"]) if r else "—"])
    inf_rows = [[n, fmt_time(inf.median(n)), f"{inf.ratio(n, 'base'):.3f}×", f"±{100 * inf.spread(n):.0f}%"]
                for n in inf.times]
    op_names = ["save", "load into a fresh base", "load-and-activate (hot swap)", "merge", "unmerge"]
    op_rows = [[o, fmt_time(ops[f"{o}: lorakit"]), fmt_time(ops[f"{o}: PEFT"]),
                f"{ops[f'{o}: PEFT'] / ops[f'{o}: lorakit']:.1f}×"] for o in op_names]
    hs = "load-and-activate (hot swap): PEFT hotswap_adapter"
    op_rows.append(["hot swap vs PEFT's `hotswap_adapter`", fmt_time(ops["load-and-activate (hot swap): lorakit"]),
                    fmt_time(ops[hs]), f"{ops[hs] / ops['load-and-activate (hot swap): lorakit']:.1f}×"])

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
    t_rows = [[t, f"{v:.3f}", "met" if (v <= lim if how == "le" else v >= lim) else "**missed**"]
              for t, v, lim, how in targets]
    n_tok = a.batch * a.seq
    prof_text = []
    for name, rows_ in prof.items():
        extra = sum(r[1] - r[2] for r in rows_)
        prof_text += [f"One step of {name} against one of the frozen bound (self CPU ms per op, largest "
                      f"differences; these {len(rows_)} ops account for {extra:+.0f} ms):", "",
                      table(["op", name, "frozen bound", "difference"],
                            [[f"`{k}`", f"{x:.1f}", f"{y:.1f}", f"{x - y:+.1f}"] for k, x, y in rows_]), ""]
    return "\n".join([
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
        table(["case", "saved for backward", "LoRA branch (over frozen)", "× PEFT", "peak RSS", "peak − before step"],
              mem_rows),
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
        "`bash benchmarks/all.sh` runs this file's suite and three more, each writing its own page: "
        "[mixed-adapter batches](RESULTS-adapters.md) (`benchmarks/adapters.py`), "
        "[DoRA and QLoRA](RESULTS-variants.md) (`benchmarks/variants.py`) and "
        "[1 → 2 processes](RESULTS-distributed.md) (`benchmarks/distributed.py`).",
        "",
    ])


if __name__ == "__main__":
    main()
