"""Fused blocks (lorakit.fused, lorakit.hf.fuse) vs transformers' eager code, side by side: RESULTS-fused.md.

    .venv/bin/python benchmarks/fused.py                  # the benchmark Llama, 1 thread (a few minutes)
    .venv/bin/python benchmarks/fused.py --quick --out /tmp/f.md

Per op (forward + backward, the shapes of the benchmark Llama at 1024 tokens) and a whole LoRA training step
(run.py's TrainCase: embeddings that require grad, LoRA r8 on the seven projections, fused AdamW, dropout 0),
fused vs unfused; cases interleave and rotate each round, ratios are medians of same-round ratios. Also the
bytes autograd keeps for backward in one step (run.py's saved_bytes).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from run import TrainCase, add_model_args, build_base, build_lorakit, saved_bytes  # noqa: E402
from run_ops import inputs  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds of the training step")
    p.add_argument("--op-rounds", type=int, default=25, help="interleaved rounds of each op")
    p.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: this process's CPU time (a loaded machine)"
    )
    p.add_argument("--quick", action="store_true", help="a tiny model and few rounds (for tests)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS-fused.md")
    a = p.parse_args(argv)
    a.device, a.argv = "cpu", list(sys.argv[1:] if argv is None else argv)
    a.timer = time.process_time if a.clock == "cpu" else time.perf_counter
    if a.quick:
        a.hidden, a.intermediate, a.layers, a.heads, a.vocab, a.batch, a.seq = 32, 64, 2, 2, 128, 2, 16
        a.rounds, a.op_rounds = 3, 3
    return a


def op_cases(a, dtype: torch.dtype) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """{op: (transformers' eager fwd+bwd, fused fwd+bwd)} at the benchmark model's shapes (a frozen norm weight)."""
    from transformers.activations import ACT2FN
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from lorakit.fused import rms_norm, rotary, swiglu

    n, hd = a.batch * a.seq, a.hidden // a.heads
    torch.manual_seed(0)
    norm = LlamaRMSNorm(a.hidden).to(dtype).requires_grad_(False)
    x = torch.randn(n, a.hidden, dtype=dtype, requires_grad=True)
    gate, up = (torch.randn(n, a.intermediate, dtype=dtype, requires_grad=True) for _ in range(2))
    q, k = (torch.randn(a.batch, a.heads, a.seq, hd, dtype=dtype, requires_grad=True) for _ in range(2))
    angles = torch.randn(a.batch, a.seq, hd // 2)
    cos, sin = (torch.cat([t, t], -1).to(dtype) for t in (angles.cos(), angles.sin()))
    act = ACT2FN["silu"]

    def step(fn, *xs):
        def run():
            out = fn(*xs)
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

        return run

    return {
        "RMSNorm (N, hidden)": (step(norm, x), step(lambda t: rms_norm(t, norm.weight, norm.variance_epsilon), x)),
        "SwiGLU (N, intermediate)": (step(lambda g, u: act(g) * u, gate, up), step(swiglu, gate, up)),
        "RoPE q, k (B, H, T, head)": (
            step(lambda qq, kk: apply_rotary_pos_emb(qq, kk, cos, sin), q, k),
            step(lambda qq, kk: rotary(qq, kk, cos, sin), q, k),
        ),
    }


def measure_ops(a) -> list[list[str]]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for op, (ref, fused) in op_cases(a, dtype).items():
            s = harness.interleaved({"eager": ref, "fused": fused}, a.op_rounds, 3, "cpu", clock=a.timer)
            rows.append(
                [
                    op,
                    str(dtype).removeprefix("torch."),
                    harness.fmt_time(s.median("eager")),
                    harness.fmt_time(s.median("fused")),
                    f"{s.ratio('fused', 'eager'):.2f}×",
                ]
            )
    return rows


def measure_step(a) -> list[list[str]]:
    from lorakit.hf.fuse import fuse_frozen_blocks

    base = build_base(a)
    ids, labels = inputs(a)
    embed = base.get_input_embeddings()
    plain = build_lorakit(a, base, 0.0)
    fused_model = copy.deepcopy(plain)
    a.fused_names = fuse_frozen_blocks(fused_model)
    cases = {"unfused": TrainCase(plain, embed, ids, labels), "fused": TrainCase(fused_model, embed, ids, labels)}
    saved = {name: saved_bytes(case) for name, case in cases.items()}
    s = harness.interleaved(cases, a.rounds, 2, "cpu", clock=a.timer)
    return [
        [
            name,
            harness.fmt_time(s.median(name)),
            f"{s.ratio(name, 'unfused'):.2f}×",
            f"±{s.spread(name):.0%}",
            harness.fmt_bytes(saved[name]),
            f"{saved[name] / saved['unfused']:.2f}×",
        ]
        for name in cases
    ]


def main(argv: list[str] | None = None) -> Path:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    load_before = harness.loadavg()
    ops, step = measure_ops(a), measure_step(a)
    kinds = sorted({n.split(":")[-1] if ":" in n else n.rsplit(".", 1)[-1] for n in a.fused_names})
    text = "\n".join(
        [
            "# Fused blocks vs transformers' eager code (lorakit.fused, lorakit.hf.fuse)",
            "",
            f"Machine: {harness.machine('cpu', a.threads)}. Load average before / after: {load_before} / "
            f"{harness.loadavg()} (a shared machine: read the ratios, not the absolute times). Clock: "
            f"{'CPU time of this process' if a.clock == 'cpu' else 'wall time'}.",
            f"Command: `python benchmarks/fused.py {' '.join(a.argv)}`. Model: Llama hidden {a.hidden}, intermediate "
            f"{a.intermediate}, {a.layers} layers, {a.heads} heads, vocab {a.vocab}, {a.batch}×{a.seq} tokens, "
            f"LoRA r{a.rank} on q/k/v/o/gate/up/down, dropout 0; swapped: {', '.join(kinds)} "
            f"({len(a.fused_names)} swaps).",
            "",
            f"## Per op: forward + backward ({a.op_rounds} interleaved rounds, medians; ratio = median of same-round "
            "fused / eager)",
            "",
            harness.table(["op", "dtype", "eager", "fused", "fused / eager"], ops),
            "",
            f"## Training step, fp32 ({a.rounds} interleaved rounds)",
            "",
            harness.table(["model", "step (median)", "vs unfused", "spread", "saved for backward", "vs unfused"], step),
            "",
        ]
    )
    a.out.write_text(text)
    print(text)
    return a.out


if __name__ == "__main__":
    main()
