"""Gradient checkpointing and sequence packing in a LoRA training step: writes benchmarks/RESULTS-checkpointing.md.

    python benchmarks/checkpointing.py                      # the benchmark model (about 2 minutes on 2 CPU cores)
    python benchmarks/checkpointing.py --quick --out /tmp/c.md   # a tiny model, seconds (the test uses this)

The Llama-style benchmark model of run.py (hidden 512, intermediate 1376, 4 layers, vocab 4096), LoRA r=8 on all
seven projections, batch 4 × 256 token ids, AdamW: the step `lorakit finetune` takes, with and without
`--gradient-checkpointing` (hf/checkpointing.py). Step times are medians over interleaved rounds; peak RSS comes
from a fresh process per case (ru_maxrss of the whole process, and VmHWM reset after the model is built, so
the second figure is the steps' own peak). Packing (hf/packing.py) is timed over whole epochs of the same
examples, unpacked (each batch padded to its longest row) and packed into 256-token rows.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import fmt_bytes, fmt_time, table  # noqa: E402
from run import TARGETS, add_model_args, build_base  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.hf import checkpointing, data, packing  # noqa: E402

HERE = Path(__file__).resolve().parent
CASES = ("plain", "gradient checkpointing")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout (finetune's masks are recomputed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the step cases")
    p.add_argument("--examples", type=int, default=16, help="examples in the packing epoch")
    p.add_argument("--epoch-rounds", type=int, default=5, help="interleaved rounds of the packing epochs")
    p.add_argument("--quick", action="store_true", help="a tiny model and few rounds (for tests)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS-checkpointing.md")
    p.add_argument("--rss-case", choices=CASES, help=argparse.SUPPRESS)  # internal: one case's peak RSS
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if a.quick:
        a.hidden, a.intermediate, a.layers, a.heads, a.vocab, a.batch, a.seq = 32, 64, 2, 2, 128, 2, 32
        a.rounds, a.examples, a.epoch_rounds = 2, 6, 1
    a.device = "cpu"
    return a


def lora_model(a: argparse.Namespace, base: torch.nn.Module, checkpointed: bool) -> torch.nn.Module:
    """The base with LoRA on every projection (B randomised so gradients flow through it), optionally checkpointed."""
    model = lk.apply_lora(
        copy.deepcopy(base), lk.LoraConfig(rank=a.rank, alpha=2.0 * a.rank, dropout=a.dropout), TARGETS
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
    if checkpointed:
        checkpointing.enable(model)  # type: ignore[arg-type]
    return model.train()


class Step:
    """One optimizer step on `batch`: forward, backward, AdamW on the LoRA parameters."""

    def __init__(self, model: torch.nn.Module, batch: dict) -> None:
        self.model, self.batch = model, batch
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def __call__(self) -> None:
        self.model(**self.batch).loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def token_batch(a: argparse.Namespace) -> dict:
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "labels": ids.clone()}


def saved_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes of distinct storages one forward keeps for the backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(**batch).loss
    del loss
    return sum(seen.values())


def rss_case(a: argparse.Namespace, name: str) -> dict:
    """In this fresh process: RSS before two steps, the steps' peak (VmHWM reset first) and ru_maxrss."""
    step = Step(lora_model(a, build_base(a), name != "plain"), token_batch(a))
    before = _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM so the model build's peak does not count
        reset = True
    except OSError:
        reset = False
    step(), step()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"before": before, "peak": _status("VmHWM") if reset else maxrss, "maxrss": maxrss}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1]) * 1024


def peak_rss(a: argparse.Namespace) -> dict[str, dict]:
    """Each case's rss_case, each in a fresh interpreter."""
    flags = [
        f"--hidden={a.hidden}",
        f"--intermediate={a.intermediate}",
        f"--layers={a.layers}",
        f"--heads={a.heads}",
        f"--vocab={a.vocab}",
        f"--rank={a.rank}",
        f"--batch={a.batch}",
        f"--seq={a.seq}",
        f"--dropout={a.dropout}",
        f"--threads={a.threads}",
    ]
    out = {}
    for name in CASES:
        r = subprocess.run([sys.executable, __file__, *flags, "--rss-case", name], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"peak-RSS subprocess for {name!r} failed:\n{r.stderr[-2000:]}")
        out[name] = json.loads(next(x for x in reversed(r.stdout.splitlines()) if x.startswith("{")))
    return out


def packing_epochs(a: argparse.Namespace, model: torch.nn.Module) -> tuple[list[list[str]], dict]:
    """Table rows for one epoch of the same examples, unpacked and packed into `a.seq`-token rows."""
    rng = random.Random(3)
    examples = []
    for _ in range(a.examples):  # lengths spread as in instruction data: many short rows, a few long ones
        n = max(2, min(a.seq, int(rng.expovariate(1 / (a.seq / 4)))))
        ids = [rng.randrange(a.vocab) for _ in range(n)]
        examples.append({"input_ids": ids, "labels": list(ids)})
    rows = packing.pack(examples, a.seq)
    unpacked = [data.collate(examples[i : i + a.batch], pad_id=0) for i in range(0, len(examples), a.batch)]
    packed = [packing.collate(rows[i : i + a.batch], pad_id=0) for i in range(0, len(rows), a.batch)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def epoch(batches: list[dict]) -> None:
        for b in batches:
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    cases = {"unpacked": functools.partial(epoch, unpacked), "packed": functools.partial(epoch, packed)}
    s = harness.interleaved(cases, a.epoch_rounds, warmup=1, device="cpu")
    stats = packing.summary(examples, rows, a.batch, seed=0)
    tokens = stats["tokens"]
    out = []
    for name, batches, count in (("unpacked", unpacked, len(examples)), ("packed", packed, len(rows))):
        padded = sum(b["input_ids"].numel() for b in batches)
        rate = tokens / s.median(name)
        out.append(
            [
                name,
                str(count),
                str(len(batches)),
                f"{100 * (padded - tokens) / padded:.1f}%",
                fmt_time(s.median(name)),
                f"{rate:,.0f}",
                f"{s.ratio('unpacked', name):.2f}×",
            ]
        )
    return out, stats


def main(argv: list[str] | None = None) -> Path | None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.rss_case:
        print(json.dumps(rss_case(a, a.rss_case)))
        return None
    t0 = time.perf_counter()
    # first, while this process is small: a child's ru_maxrss starts from its parent's RSS at the fork
    rss = peak_rss(a)
    base = build_base(a)
    batch = token_batch(a)
    models = {name: lora_model(a, base, name != "plain") for name in CASES}
    saved = {name: saved_bytes(m, batch) for name, m in models.items()}
    steps = {name: Step(m, batch) for name, m in models.items()}
    s = harness.interleaved(steps, a.rounds, warmup=1, device="cpu")  # type: ignore[arg-type]
    step_rows = []
    for name in CASES:
        r = rss[name]
        step_rows.append(
            [
                name,
                fmt_time(s.median(name)),
                f"{s.ratio(name, 'plain'):.2f}×",
                f"±{100 * s.spread(name):.0f}%",
                fmt_bytes(saved[name]),
                fmt_bytes(r["maxrss"]),
                fmt_bytes(r["peak"] - r["before"]),
            ]
        )
    pack_rows, stats = packing_epochs(a, models["plain"])
    text = "\n".join(
        [
            "# Gradient checkpointing and sequence packing",
            "",
            f"Command: `{' '.join(['python benchmarks/checkpointing.py', *a.argv])}` "
            f"({time.perf_counter() - t0:.0f} s)",
            "",
            f"Machine: {harness.machine('cpu', a.threads)}.",
            "",
            f"Model: Llama-style, hidden {a.hidden}, intermediate {a.intermediate}, "
            f"{a.layers} layers, vocab {a.vocab}; "
            f"LoRA r={a.rank} on {', '.join(TARGETS)}, dropout {a.dropout:g}; batch "
            f"{a.batch} × {a.seq} token ids, AdamW.",
            "",
            "## Training step: `--gradient-checkpointing`",
            "",
            table(
                [
                    "case",
                    "step (median)",
                    "× plain",
                    "noise",
                    "saved for backward",
                    "peak RSS (ru_maxrss)",
                    "peak − before steps",
                ],
                step_rows,
            ),
            "",
            f"Medians over {a.rounds} interleaved rounds (after one warm-up round); × "
            "plain is the median of same-round "
            "ratios. Saved for backward: distinct storages kept by one forward (saved-tensor hooks, parameters "
            "excluded). Peak RSS: a fresh process per case (started before the parent builds anything, since a "
            "child's ru_maxrss starts from its parent's RSS), two steps; ru_maxrss counts the whole process (imports "
            "and model build included), the last column the steps alone (VmHWM reset after the build).",
            "",
            "## Packing: `--pack`",
            "",
            table(
                ["case", "rows", "batches", "padding", "epoch (median)", "real tokens/s", "× unpacked speed"], pack_rows
            ),
            "",
            f"One epoch over the same {stats['rows_before']} examples ({stats['tokens']} real tokens; lengths drawn "
            f"from an exponential of mean {a.seq // 4}, 2 to {a.seq} tokens), batch {a.batch} rows, no checkpointing; "
            f"medians over {a.epoch_rounds} interleaved rounds, × unpacked speed the median of same-round ratios. "
            "The packed epoch also takes fewer optimizer steps (one per batch). Padding here is the epoch's actual "
            "batches; the finetune report gives the same fraction for a seeded order "
            f"({100 * stats['padding_fraction_unpacked']:.1f}% → {100 * stats['padding_fraction_packed']:.1f}%).",
            "",
        ]
    )
    a.out.write_text(text)
    return a.out


if __name__ == "__main__":
    written = main()
    if written is not None:
        print(f"wrote {written}")
