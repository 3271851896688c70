"""benchmarks/run.py's inference cases, adapter operations (load, swap, merge) and profile comparison."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import harness
import torch


def inputs(a):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(a.device)
    return ids, ids.clone()  # labels: HF shifts them inside the loss


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
        diffs = {
            "lorakit unmerged vs merged": (lorakit_model.eval()(input_ids=ids).logits - merged(input_ids=ids).logits)
            .abs()
            .max()
            .item()
        }
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
    setup = {
        "load into a fresh base: lorakit": fresh,
        "load into a fresh base: PEFT": fresh,
        "load-and-activate (hot swap): PEFT": peft_swap_cleanup,
    }
    s = harness.interleaved(cases, a.fast_rounds, 1, a.device, setup)
    peft_swap_cleanup()
    out = {n: s.median(n) for n in cases}
    # merge/unmerge in place (reversible) must alternate, so pair them by hand
    times = {k: [] for k in ("merge: lorakit", "unmerge: lorakit", "merge: PEFT", "unmerge: PEFT")}
    for r in range(a.fast_rounds + 1):
        order = [
            ("lorakit", lambda: lk.merge_(lkm), lambda: lk.unmerge_(lkm)),
            ("PEFT", pm.merge_adapter, pm.unmerge_adapter),
        ]
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
