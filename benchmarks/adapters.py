"""Many adapters on one base: a mixed-adapter batch against a single-adapter batch, lorakit and PEFT.

    python benchmarks/adapters.py            # writes benchmarks/RESULTS-adapters.md

The Llama-style benchmark model (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 4096), 16 adapters of
rank 8 on all seven projections; a batch of 16 rows × 64 tokens in which every row uses a different adapter,
against the same batch on one adapter. Both libraries get the same adapter files; one process, interleaved.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from run import TARGETS, add_model_args, build_base  # noqa: E402

import lorakit as lk  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS-adapters.md")
    a = p.parse_args(argv)
    a.seq = max(a.seq, 1)
    return a


def models(a: argparse.Namespace, base: torch.nn.Module, names: list[str], gen: torch.Generator):
    """lorakit's and PEFT's copies of `base` with the same adapters `names` loaded (from files lorakit saved)."""
    import peft

    tmp = Path(tempfile.mkdtemp())
    for n in names:  # distinct adapter files, saved by lorakit (PEFT loads them as they are)
        m = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=a.rank, alpha=2.0 * a.rank), TARGETS)
        with torch.no_grad():
            for layer in lk.lora_layers(m).values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
        lk.save_adapters(m, tmp / n)
        del m
    lkm = copy.deepcopy(base)
    for n in names:
        lk.load_adapters(lkm, tmp / n, name=n)
    lk.set_adapter(lkm, names[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / names[0]), adapter_name=names[0])
        for n in names[1:]:
            pm.load_adapter(str(tmp / n), adapter_name=n)
    pm.set_adapter(names[0])
    pm.eval()
    return lkm, pm


def main(argv: list[str] | None = None) -> Path:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    base = build_base(a).eval()
    names = [f"a{i}" for i in range(a.adapters)]
    gen = torch.Generator().manual_seed(0)
    lkm, pm = models(a, base, names, gen)
    ids = torch.randint(0, a.vocab, (a.adapters, a.seq), generator=gen).to(a.device)

    with torch.no_grad():  # the two libraries agree row by row before anything is timed
        with lk.mixed_batch(lkm, names):
            ours = lkm(input_ids=ids).logits
        theirs = pm(input_ids=ids, adapter_names=names).logits
    agree = (ours - theirs).abs().max().item()

    def lk_single():
        with torch.no_grad():
            lkm(input_ids=ids)

    def lk_mixed():
        with torch.no_grad(), lk.mixed_batch(lkm, names):
            lkm(input_ids=ids)

    def pf_single():
        with torch.no_grad():
            pm(input_ids=ids)

    def pf_mixed():
        with torch.no_grad():
            pm(input_ids=ids, adapter_names=names)

    def base_only():
        with torch.no_grad(), lk.disable_adapters(lkm):
            lkm(input_ids=ids)

    def decode(model, steps=16, **kw):  # a prefill, then one token per row per step with the KV cache
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True, **kw)
            for _ in range(steps):
                out = model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True, **kw)

    def lk_decode_mixed():
        with lk.mixed_batch(lkm, names):
            decode(lkm)

    gen_cases = {
        "lorakit single adapter": lambda: decode(lkm),
        "lorakit mixed batch": lk_decode_mixed,
        "PEFT single adapter": lambda: decode(pm),
        "PEFT mixed batch": lambda: decode(pm, adapter_names=names),
    }
    g = harness.interleaved(gen_cases, max(3, a.rounds // 2), warmup=1, device=a.device)

    cases = {
        "base (adapters disabled)": base_only,
        "lorakit single adapter": lk_single,
        "lorakit mixed batch": lk_mixed,
        "PEFT single adapter": pf_single,
        "PEFT mixed batch": pf_mixed,
    }
    s = harness.interleaved(cases, a.rounds, warmup=2, device=a.device)
    base_bytes = sum(t.numel() * t.element_size() for t in base.parameters())
    total = sum(t.numel() * t.element_size() for t in lkm.parameters())
    one = sum(t.numel() * t.element_size() for t in lk.saving.adapter_state_dict(lkm, names[0]).values())
    text = report(a, argv, t0, agree, s, g, cases, gen_cases, (base_bytes, one, total))
    a.out.write_text(text)
    return a.out


def report(a, argv, t0, agree, s, g, cases, gen_cases, sizes) -> str:
    """RESULTS-adapters.md: the batch timings `s`, the decode timings `g`, the targets and the memory."""
    base_bytes, one, total = sizes
    rows = [[n, harness.fmt_time(s.median(n)), f"±{100 * s.spread(n):.0f}%"] for n in cases]
    mixed_ratio = s.ratio("lorakit mixed batch", "lorakit single adapter")
    peft_ratio = s.ratio("PEFT mixed batch", "PEFT single adapter")
    return "\n".join(
        [
            "# Many adapters on one base: mixed-adapter batches",
            "",
            f"Command: `python benchmarks/adapters.py {' '.join(argv or sys.argv[1:])}` "
            f"({time.perf_counter() - t0:.0f} s)",
            "",
            f"Machine: {harness.machine(a.device, a.threads)}.",
            "",
            f"Model: the Llama-style benchmark model (hidden {a.hidden}, intermediate {a.intermediate}, "
            f"{a.layers} layers, vocab {a.vocab}); {a.adapters} adapters of rank {a.rank} on {', '.join(TARGETS)}; "
            f"a batch of {a.adapters} rows × {a.seq} tokens, row i on adapter i (mixed) "
            "or every row on one adapter (single). "
            f"{a.rounds} interleaved rounds; medians, ratios are medians of same-round ratios. lorakit and PEFT "
            f"logits agree to {agree:.1e} on the mixed batch.",
            "",
            harness.table(["case", "median", "noise"], rows),
            "",
            f"Generation: a prefill of the same batch, then 16 decode steps of one token per row (KV cache), "
            f"{max(3, a.rounds // 2)} interleaved rounds:",
            "",
            harness.table(
                ["case", "median", "× single adapter"],
                [
                    [
                        n,
                        harness.fmt_time(g.median(n)),
                        f"{g.ratio(n, n.replace('mixed batch', 'single adapter')):.3f}×" if "mixed" in n else "1×",
                    ]
                    for n in gen_cases
                ],
            ),
            "",
            harness.table(
                ["target", "measured", ""],
                [
                    [
                        "lorakit mixed batch ≤ 1.10× its single-adapter batch",
                        f"{mixed_ratio:.3f}",
                        "met" if mixed_ratio <= 1.10 else "**missed**",
                    ],
                    ["(PEFT, same measure)", f"{peft_ratio:.3f}", ""],
                    [
                        "lorakit mixed batch vs PEFT mixed batch",
                        f"{s.ratio('PEFT mixed batch', 'lorakit mixed batch'):.2f}× faster",
                        "",
                    ],
                ],
            ),
            "",
            f"Memory: the base holds {harness.fmt_bytes(base_bytes)}; each adapter {harness.fmt_bytes(one)}; the model "
            f"with {a.adapters} adapters holds {harness.fmt_bytes(total)} = base + {(total - base_bytes) / one:.2f} "
            "adapters' bytes (no copy of the base). Mixed batches stack the adapters per layer (zero-padded to the "
            "largest rank, scaling folded into B; cached until an adapter changes) and use gathers + bmm.",
            "",
        ]
    )


if __name__ == "__main__":
    print(f"wrote {main()}")
