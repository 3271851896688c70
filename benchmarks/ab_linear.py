"""The LoRA linear and the optimizer at a git revision against the working tree's: training steps, interleaved.

    .venv/bin/python benchmarks/ab_linear.py --before REV [--dropout 0.1] [--rounds 9]

The model and cases are run.py's (Llama-style, LoRA on all seven projections, embeddings that require
grad). "before" runs `lorakit/ops_linear.py` as it was at REV with the per-tensor AdamW the trainer used
then; "after" runs the working tree's with the trainer's optimizer (`lorakit.train.schedule.adamw`). Both
against the frozen bound in the same rounds; ratios are medians of same-round ratios (harness.py). Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def old_ops_linear(rev: str):
    """lorakit/ops_linear.py as it was at `rev`, imported as a stand-alone module (it imports torch only)."""
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:src/lorakit/ops_linear.py"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_ops_linear.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_ops_linear", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    run.add_model_args(p)
    p.add_argument("--before", required=True, help="git revision of the 'before' ops_linear.py")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="cpu",
        help="cpu: this process's CPU time (one torch thread), which other load on a shared machine "
        "perturbs far less than wall time",
    )
    a = p.parse_args(argv)
    a.device = "cpu"
    torch.set_num_threads(1)
    import lorakit.ops as ops

    after_fn, before_fn = ops.lora_linear, old_ops_linear(a.before).lora_linear
    base = run.build_base(a)
    ids, labels = run.inputs(a)
    embed = base.get_input_embeddings()

    def case(fn, per_tensor_adamw: bool):
        c = run.TrainCase(run.build_lorakit(a, base, a.dropout), embed, ids, labels)
        if per_tensor_adamw:  # what the trainer built before it used the fused kernel
            c.opt = torch.optim.AdamW([q for q in c.model.parameters() if q.requires_grad], lr=1e-4)

        def step():
            ops.lora_linear = fn  # layers call ops.lora_linear through the module
            try:
                c()
            finally:
                ops.lora_linear = after_fn

        return step

    cases = {
        "frozen bound": run.TrainCase(run.frozen(copy.deepcopy(base)), embed, ids, labels),
        "before": case(before_fn, True),
        "after": case(after_fn, False),
    }
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    s = harness.interleaved(cases, rounds=a.rounds, warmup=1, device="cpu", clock=clock)
    rows = [
        [
            n,
            harness.fmt_time(s.median(n)),
            f"{s.ratio(n, 'frozen bound'):.3f}×",
            f"{s.ratio(n, 'before'):.3f}×",
            f"±{s.spread(n) * 100:.0f}%",
        ]
        for n in cases
    ]
    print(f"dropout {a.dropout:g}, before = {a.before}, {a.rounds} rounds, {a.clock} time")
    print(harness.table(["case", "median", "× frozen bound", "× before", "noise"], rows))


if __name__ == "__main__":
    main()
