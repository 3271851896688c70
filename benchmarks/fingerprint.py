"""What adapter provenance costs: hashing the whole base (every tensor of its forward) at a first load.

    python benchmarks/fingerprint.py            # writes benchmarks/RESULTS-fingerprint.md
    python benchmarks/fingerprint.py --quick    # a tiny model, seconds (tests)

The base has Llama-3.2-1B's shapes (hidden 2048, intermediate 8192, 16 layers, 32/8 heads, vocab 128256, tied
embeddings: 1.24 B parameters, 4.9 GB in fp32), built on the meta device and filled with random values (no
download, no 5 GB init pass of transformers). On one thread (`torch.set_num_threads(1)`, which also caps the
fingerprint's own threads), measured:

- `base_fingerprint` from scratch (a fresh `Fingerprints`): every byte of every tensor hashed, fp32 and bf16;
- `load_adapters` of a rank-8 q/v adapter with its lorakit.json onto that base with a fresh `Fingerprints`
  (it hashes the whole base) against the same adapter without lorakit.json (nothing checked): the difference
  is what a first load adds;
- the same checked load with the `Fingerprints` kept from before (a hot swap: nothing re-hashed).

Interleaved rounds, medians (harness.py).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import fmt_time, interleaved, loadavg, machine, table  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.fingerprint import Fingerprints, base_fingerprint  # noqa: E402

HERE = Path(__file__).parent
ONE_B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=True,
)  # Llama-3.2-1B
QUICK = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    tie_word_embeddings=True,
)
TARGETS = ["q_proj", "v_proj"]


def build(shape: dict, dtype: torch.dtype) -> torch.nn.Module:
    """A Llama of `shape` with random weights in `dtype`: built on the meta device, then filled tensor by tensor."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=2048))
    model = model.to_empty(device="cpu").to(dtype)
    model.tie_weights()  # to_empty gave lm_head storage of its own: tie it to the embeddings again
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05, generator=gen)  # buffers left as they are: non-persistent, never hashed or run
    return model.eval()


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a tiny model and 2 rounds (for tests)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS-fingerprint.md")
    a = p.parse_args(argv)
    rounds = 2 if a.quick else a.rounds
    shape = QUICK if a.quick else ONE_B
    torch.set_num_threads(1)
    rows, figures = [], {}
    for dtype in (torch.float32, torch.bfloat16):
        params, dtype_rows, figures[str(dtype).removeprefix("torch.")] = measure(shape, dtype, rounds)
        rows += dtype_rows
    lines = [
        "# Adapter provenance: cost of the whole-base fingerprint (benchmarks/fingerprint.py)",
        "",
        f"{'A tiny Llama (--quick)' if a.quick else 'Llama-3.2-1B shapes'}: {params / 1e6:,.1f} M parameters; a "
        f"rank-8 adapter on {', '.join(TARGETS)}. One thread, median of {rounds} interleaved rounds.",
        f"Machine: {machine('cpu', 1)}; load average {loadavg()}.",
        "",
        table(["step", "CPU time (one thread)", "wall time", "rate (CPU)"], rows),
        "",
        "Every byte of every tensor is hashed: a floating tensor is converted to bf16 a million elements at a time "
        "into one reused buffer and streamed into xxh3-128 (the tensor is read once; the buffer stays in cache), "
        "any other tensor's bytes as stored. A first load of the fp32 base adds "
        f"{figures['float32'][0]:.2f} s of CPU time on one thread ({figures['float32'][1]:.2f} s wall here), of the "
        f"bf16 base {figures['bfloat16'][0]:.2f} s ({figures['bfloat16'][1]:.2f} s wall); target: at most 1 s.",
        "",
    ]
    a.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return a.out


def measure(shape: dict, dtype: torch.dtype, rounds: int) -> tuple[int, list[list[str]], tuple[float, float]]:
    """(parameters, table rows, (CPU, wall) seconds a first checked load adds) for one dtype of the base."""
    base = build(shape, dtype)
    unique = {id(t): t for t in base.state_dict(keep_vars=True).values()}.values()  # a tied tensor once
    params = sum(t.numel() for t in unique)
    nbytes = sum(t.numel() * t.element_size() for t in unique)
    targeted = [n for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    tmp = Path(tempfile.mkdtemp())
    lk.save_adapters(lk.apply_lora(base, lk.LoraConfig(rank=8, alpha=16.0), TARGETS), tmp / "checked")
    shutil.copytree(tmp / "checked", tmp / "unchecked")
    (tmp / "unchecked" / "lorakit.json").unlink()
    names, kept = itertools.count(), Fingerprints()
    lk.load_adapters(base, tmp / "checked", name="kept", fingerprints=kept)

    def load(directory: Path, fp: Fingerprints) -> None:
        lk.load_adapters(base, directory, name=f"a{next(names)}", fingerprints=fp)  # a new slot each call

    cases = {
        "fingerprint": lambda: base_fingerprint(base, targeted, Fingerprints()),
        "checked": lambda: load(tmp / "checked", Fingerprints()),
        "unchecked": lambda: load(tmp / "unchecked", Fingerprints()),
        "hot": lambda: load(tmp / "checked", kept),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lk.ProvenanceNote)
        # CPU time of this one thread (what the work costs; other load on a shared machine barely moves it),
        # then wall time (what it took here, with that load)
        s = interleaved(cases, rounds, warmup=0, device="cpu", clock=time.process_time)
        w = interleaved(cases, rounds, warmup=0, device="cpu")
    shutil.rmtree(tmp)
    kind = str(dtype).removeprefix("torch.")
    first, first_wall = (x.median("checked") - x.median("unchecked") for x in (s, w))

    def row(what: str, case: str) -> list[str]:
        return [f"{kind}: {what}", fmt_time(s.median(case)), fmt_time(w.median(case))]

    rows = [
        [
            *row(f"`base_fingerprint`, every tensor ({nbytes / 1e9:.2f} GB)", "fingerprint"),
            f"{nbytes / 1e9 / s.median('fingerprint'):.1f} GB/s",
        ],
        [*row("first `load_adapters`, checked (hashes the base)", "checked"), ""],
        [*row("the same without lorakit.json (nothing checked)", "unchecked"), ""],
        [f"{kind}: **what a first load adds**", f"**{fmt_time(first)}**", fmt_time(first_wall), ""],
        [*row("hot swap, `Fingerprints` kept (nothing re-hashed)", "hot"), ""],
    ]
    return params, rows, (first, first_wall)


if __name__ == "__main__":
    main()
