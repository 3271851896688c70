"""The causal-LM loss plain vs chunked in a LoRA training step: writes benchmarks/RESULTS-chunked-ce.md.

    python benchmarks/chunked_ce.py                         # vocab 4096, 32000, 128256 (about 6 minutes, 2 cores)
    python benchmarks/chunked_ce.py --quick --out /tmp/c.md  # a tiny model, seconds

The Llama-style benchmark model of run.py (hidden 512, intermediate 1376, 8 heads; `--layers`, default 2), LoRA
r=8 on all seven projections, batch 4 × 256 token ids = 1024 tokens, every one a trained label (the chunked
loss's worst case: with masked prompts or padding fewer positions reach its lm_head). A step is the loss's
forward and backward: `model(**batch).loss` (plain: transformers' logits, upcast, cross-entropy) against
`CausalLMChunkedLoss` (hf/causal_loss.py). Step times are medians over interleaved rounds in one process at
`--threads` (1); peak memory is measured in a fresh process per case: VmHWM of /proc/self/status, reset
(clear_refs) after the model and batch are built, over two steps, minus the RSS before them: the steps' own peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import fmt_bytes, fmt_time, table  # noqa: E402
from run import build_base, build_lorakit  # noqa: E402

from lorakit.hf.causal_loss import CHUNKED_LOSS_MIN_VOCAB, CausalLMChunkedLoss  # noqa: E402

HERE = Path(__file__).resolve().parent
LOSSES = ("plain", "chunked")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--vocabs", default="4096,32000,128256")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a tiny model and few rounds (for tests)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS-chunked-ce.md")
    p.add_argument("--rss-case", help=argparse.SUPPRESS)  # internal: "vocab:loss" peak memory, in a fresh process
    a = p.parse_args(argv)
    if a.quick:
        a.hidden, a.intermediate, a.layers, a.heads, a.vocabs, a.seq, a.rounds = 64, 128, 1, 4, "512,2048", 32, 2
    a.device = "cpu"
    return a


def step_fn(a: argparse.Namespace, vocab: int, loss: str):
    """One case's step (loss forward and backward), with its model and batch built."""
    a.vocab = vocab
    model = build_lorakit(a, build_base(a), 0.0).train()
    ids = torch.randint(0, vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    objective = CausalLMChunkedLoss(model)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        out = model(**batch).loss if loss == "plain" else objective(model, batch).loss
        out.backward()
        return float(out.detach())

    return step


def rss_case(a: argparse.Namespace, vocab: int, loss: str) -> dict[str, int]:
    """In this fresh process: the RSS before two steps and the steps' peak (VmHWM reset after the build)."""
    step = step_fn(a, vocab, loss)
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM so the build's own peak does not count
    step(), step()
    return {"before": before, "peak": _status("VmHWM")}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1]) * 1024


def peak_rss(a: argparse.Namespace, vocab: int, loss: str) -> dict[str, int]:
    """rss_case in a fresh interpreter."""
    flags = [f"--{k}={getattr(a, k)}" for k in ("hidden", "intermediate", "layers", "heads", "rank", "batch", "seq")]
    cmd = [sys.executable, __file__, *flags, f"--threads={a.threads}", f"--rss-case={vocab}:{loss}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"peak-RSS subprocess for {vocab}:{loss} failed:\n{r.stderr[-2000:]}")
    return json.loads(next(x for x in reversed(r.stdout.splitlines()) if x.startswith("{")))


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.rss_case:
        vocab, loss = a.rss_case.split(":")
        print(json.dumps(rss_case(a, int(vocab), loss)))
        return
    rows = []
    for vocab in (int(v) for v in a.vocabs.split(",")):
        steps = {loss: step_fn(a, vocab, loss) for loss in LOSSES}
        losses = {loss: fn() for loss, fn in steps.items()}
        assert abs(losses["plain"] - losses["chunked"]) < 1e-4, losses
        s = harness.interleaved(steps, rounds=a.rounds, warmup=1, device="cpu")
        mem = {loss: peak_rss(a, vocab, loss) for loss in LOSSES}
        used = {loss: m["peak"] - m["before"] for loss, m in mem.items()}
        rows.append(
            [
                f"{vocab:,}",
                fmt_time(s.median("plain")),
                fmt_time(s.median("chunked")),
                f"{s.ratio('chunked', 'plain'):.2f}×",
            ]
            + [fmt_bytes(used["plain"]), fmt_bytes(used["chunked"]), f"{used['chunked'] / used['plain']:.2f}×"]
            + [fmt_bytes(mem["plain"]["peak"]), fmt_bytes(mem["chunked"]["peak"])]
        )
        print(" | ".join(rows[-1]), flush=True)
        del steps
    write(a, rows)


def write(a: argparse.Namespace, rows: list[list[str]]) -> None:
    header = ["vocab", "plain step", "chunked step", "chunked / plain (time)", "plain: steps' peak"]
    header += ["chunked: steps' peak", "chunked / plain (memory)", "plain: process peak", "chunked: process peak"]
    text = "\n".join(
        [
            "# Chunked cross-entropy: plain vs chunked causal-LM loss in a LoRA training step",
            "",
            f"Machine: {harness.machine('cpu', a.threads)}; load average {harness.loadavg()} (a shared machine).",
            "",
            f"`python benchmarks/chunked_ce.py {' '.join(sys.argv[1:])}`: a Llama-style model (hidden {a.hidden}, "
            f"intermediate {a.intermediate}, {a.layers} layers, {a.heads} heads), LoRA r={a.rank} on all seven "
            f"projections (lm_head frozen), batch {a.batch} × {a.seq} = {a.batch * a.seq} tokens, every one a trained "
            "label. A step is the loss's forward and backward. Times: medians over "
            f"{a.rounds} interleaved rounds in one process, and the median of the per-round ratios.",
            "Memory: a fresh process per case; the steps' peak is VmHWM (reset after the build) minus the RSS "
            "before two steps; the process peak is VmHWM itself (model, batch and steps).",
            "",
            table(header, rows),
            "",
            f"`CHUNKED_LOSS_MIN_VOCAB` = {CHUNKED_LOSS_MIN_VOCAB} (hf/causal_loss.py): `loss=auto` takes the chunked "
            "loss from that vocabulary up.",
            "",
        ]
    )
    a.out.write_text(text, encoding="utf-8")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
