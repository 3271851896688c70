"""What adapter provenance costs (issue 17): hashing the base at save and load, and a load's overhead.

    python benchmarks/fingerprint.py            # writes benchmarks/RESULTS-fingerprint.md

The Llama-style benchmark model (hidden 512, intermediate 1376, 4 layers), LoRA rank 8 on all seven
projections. Measured: hashing every targeted weight (fp32 and bf16 bases: bf16 bytes either way), MB/s of
weight bytes hashed, and `load_adapters` into a fresh base (hashes the base once) against a hot swap onto
the same base (cached hashes) and against the same adapter without lorakit.json (nothing checked).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from run import TARGETS, add_model_args, build_base  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit import fingerprint  # noqa: E402
from lorakit.files import provenance  # noqa: E402

SEVEN_B_TARGETED = 6.48e9  # Llama-2-7B parameters in the seven projections of its 32 layers
SEVEN_B_QV = 32 * 2 * 4096 * 4096  # q_proj and v_proj only


def best(fn, rounds: int) -> float:
    """The fastest of `rounds` runs, in seconds."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS-fingerprint.md")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    base = build_base(a).eval()
    names = [n for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    weights = [base.get_submodule(n).weight for n in names]
    params = sum(w.numel() for w in weights)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        ws = [w.detach().to(dtype) for w in weights]
        s = best(lambda ws=ws: [provenance.weight_digest(w) for w in ws], a.rounds)
        mb = params * 2 / 1e6  # bf16 bytes hashed
        rows.append((f"hash {len(ws)} targeted weights ({str(dtype).removeprefix('torch.')} base)", s, mb / s))
    bf16_rate = rows[-1][2]

    tmp = Path(tempfile.mkdtemp())
    model = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=a.rank), TARGETS)
    lk.save_adapters(model, tmp / "a")
    shutil.copytree(tmp / "a", tmp / "peft")
    (tmp / "peft" / "lorakit.json").unlink()
    fresh = [copy.deepcopy(base) for _ in range(a.rounds * 2)]
    swap = lk.load_adapters(copy.deepcopy(base), tmp / "a", name="first")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lk.ProvenanceNote)
        first = best(lambda: lk.load_adapters(fresh.pop(), tmp / "a"), a.rounds)
        unchecked = best(lambda: lk.load_adapters(fresh.pop(), tmp / "peft"), a.rounds)
        hot = best(lambda: lk.load_adapters(swap, tmp / "a", name="first"), a.rounds)
        hot_unchecked = best(lambda: lk.load_adapters(swap, tmp / "peft", name="first"), a.rounds)
    check = best(lambda: fingerprint.base_fingerprint(swap, names), a.rounds)
    shutil.rmtree(tmp)

    lines = [
        "# Adapter provenance: cost of the base fingerprint (benchmarks/fingerprint.py)",
        "",
        f"Llama-style model: hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers; LoRA rank {a.rank} "
        f"on {len(names)} targeted weights ({params / 1e6:.1f} M parameters). One thread, best of {a.rounds}.",
        "",
        "| step | time | rate |",
        "|---|---:|---:|",
        *[f"| {what} | {s * 1e3:.1f} ms | {rate:.0f} MB/s of bf16 bytes |" for what, s, rate in rows],
        f"| `load_adapters` into a fresh base (hashes the base) | {first * 1e3:.1f} ms | |",
        f"| the same adapter without lorakit.json (no check) | {unchecked * 1e3:.1f} ms | |",
        f"| hot swap onto the same base (hashes cached) | {hot * 1e3:.1f} ms | |",
        f"| hot swap without lorakit.json | {hot_unchecked * 1e3:.1f} ms | |",
        f"| `base_fingerprint` again (cached) | {check * 1e3:.2f} ms | |",
        "",
        f"Extrapolated to a 7B Llama at {bf16_rate:.0f} MB/s: all seven projections ({SEVEN_B_TARGETED / 1e9:.2f} B "
        f"parameters, {SEVEN_B_TARGETED * 2 / 1e9:.1f} GB as bf16) {SEVEN_B_TARGETED * 2 / 1e6 / bf16_rate:.1f} s; "
        f"q_proj and v_proj only {SEVEN_B_QV * 2 / 1e6 / bf16_rate:.1f} s; once per base object, then cached.",
        "",
    ]
    a.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return a.out


if __name__ == "__main__":
    main()
