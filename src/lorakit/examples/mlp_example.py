"""`lorakit example`: pre-train an MLP, fine-tune it with LoRA on a shifted task, save, reload, merge, check.

    1. pre-train SimpleMlp on task A (for real), save its weights (safetensors)
    2. LoRA r=4, alpha=8 on fc1 and fc2 (fc3 stays frozen, without LoRA)
    3. fine-tune on task B with the trainer and its dashboard; task-B loss before and after
    4. save the adapter; its files' sizes against the full model's
    5. rebuild a fresh base from the saved weights, load the adapter: outputs must be equal
    6. merge: outputs must match the unmerged model's within 1e-5

Every check that fails makes the run exit non-zero. `check_only` reruns 5 and 6 on a finished run's
artifact directory (so a tampered adapter is caught there too). `resume` continues a killed run from its
last checkpoint (the fine-tune checkpoints at the end of each epoch) and ends with the same adapter bytes.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lorakit as lk

from ..errors import LoraError
from ..files import safetensors as safetensors_io
from ..train import TrainConfig, Trainer
from ..train.artifacts import CHECKPOINT
from ..train.dashboard import Dashboard
from ..train.device import resolve_device
from ..train.distributed import is_main
from ..train.reporting import PlainLog
from ..ui.tables import table, to_text
from .simple_mlp import SimpleMlp, loaders

BASE_FILE, PROBE_FILE, ADAPTER_DIR, TRAIN_DIR = "base_model.safetensors", "probe.safetensors", "adapter", "train"
MERGE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class ExampleOptions:
    """The example's knobs (the CLI's flags)."""

    epochs: int = 12
    rank: int = 4
    alpha: float = 8.0
    device: str = "cpu"
    artifact_dir: Path = Path("artifacts/example")
    seed: int = 0
    pretrain_epochs: int = 15
    check_only: bool = False
    resume: bool = False


def say(text: str = "") -> None:
    """The example's report goes to stdout, a line at a time (plain text: fine in pipes and logs); rank 0's only."""
    if is_main():
        print(text, flush=True)


def _mse(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """The model's mean squared error on (x, y), without gradients."""
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def _size(path: Path) -> str:
    """A file's size in bytes, for the report."""
    return f"{path.stat().st_size:,} B"


def run(opts: ExampleOptions) -> int:
    """The whole example; returns the process exit status (0: every check passed)."""
    if opts.check_only:
        return 0 if check_artifacts(opts.artifact_dir) else 1
    if resolve_device(opts.device).type == "cpu":  # (a missing device is an error before any work)
        torch.set_num_threads(1)  # ops this small only pay for thread hand-offs (17× slower on a busy machine)
    out = Path(opts.artifact_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    torch.manual_seed(opts.seed)
    train_a, valid_a = loaders("A", 8192, 1024, 64, opts.seed)
    train_b, valid_b = loaders("B", 2048, 1024, 32, opts.seed + 1)
    assert isinstance(valid_b.dataset, TensorDataset)  # what loaders() builds
    xb, yb = valid_b.dataset.tensors

    resume = opts.resume and (out / TRAIN_DIR / CHECKPOINT).is_file() and (out / BASE_FILE).is_file()
    if opts.resume and not resume:
        say("      resume: no checkpoint in this artifact directory yet; starting from the beginning")
    model = SimpleMlp()
    _base(model, opts, out, train_a, valid_a, resume)
    before = _mse(model, xb, yb)
    _fine_tune(model, opts, out, train_b, valid_b, resume)
    if not is_main():  # under torchrun the other ranks only train; rank 0 saves and checks
        return 0
    model.cpu().eval()
    after = _mse(model, xb, yb)
    improved = after < before
    say(
        f"      task B loss: base {before:.4f} → LoRA {after:.4f} ({before / max(after, 1e-12):.1f}× lower)"
        + ("" if improved else "  FAILED: not lower")
    )
    _save(model, out, xb)
    ok = check_artifacts(out) and improved
    say(
        f"{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {time.perf_counter() - t_start:.1f}s; "
        f"artifacts: {out}"
    )
    return 0 if ok else 1


def _base(
    model: SimpleMlp, opts: ExampleOptions, out: Path, train: DataLoader[Any], valid: DataLoader[Any], resume: bool
) -> None:
    """Step 1: pre-train `model` on task A and save it as the base (a resumed run reads the saved base)."""
    if resume:  # pre-training finished before the run was killed: its saved weights are the base
        model.load_state_dict(safetensors_io.read(out / BASE_FILE)[0])
        say(f"[1/6] resume: base weights from {out / BASE_FILE}, fine-tune from its last checkpoint")
    else:
        say(f"[1/6] pre-train SimpleMlp (32→64→64→1) on task A, {opts.pretrain_epochs} epochs")
        pre_cfg = TrainConfig(
            epochs=opts.pretrain_epochs,
            lr=3e-3,
            schedule="cosine",
            warmup_steps=20,
            device=opts.device,
            seed=opts.seed,
            log_every=50,
        )
        t = time.perf_counter()
        live = (
            [Dashboard(title="lorakit example · pre-training on task A", transient=True)] if sys.stdout.isatty() else []
        )
        result = Trainer(model, pre_cfg, loss_fn=nn.functional.mse_loss, callbacks=live).fit(train, valid)
        model.cpu().eval()
        if is_main():  # under torchrun: rank 0 writes, every rank trains
            safetensors_io.write(out / BASE_FILE, model.state_dict(), {"format": "pt"})
        say(f"      task A valid loss {result.valid_loss:.4f} (the mean scores 1.0), {time.perf_counter() - t:.1f}s")
    if is_main():
        say(f"      base weights: {out / BASE_FILE} ({_size(out / BASE_FILE)})")


def _fine_tune(
    model: SimpleMlp, opts: ExampleOptions, out: Path, train: DataLoader[Any], valid: DataLoader[Any], resume: bool
) -> None:
    """Steps 2 and 3: LoRA on fc1 and fc2, fine-tuned on task B (from its checkpoint, resumed)."""
    cfg = lk.LoraConfig(rank=opts.rank, alpha=opts.alpha, dropout=0.0, bias="none")
    lk.apply_lora(model, cfg, targets=["fc1", "fc2"])
    trainable, total = lk.trainable_parameters(model)
    say(f"[2/6] LoRA on fc1, fc2: rank {cfg.rank}, alpha {cfg.alpha:g}, scaling {cfg.scaling:g}")
    say(f"      trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

    say(f"[3/6] fine-tune on task B, {opts.epochs} epochs; run artifacts: {out / TRAIN_DIR}")
    ft_cfg = TrainConfig(
        epochs=opts.epochs,
        lr=1e-2,
        schedule="cosine",
        warmup_steps=20,
        device=opts.device,
        seed=opts.seed,
        log_every=16,
        checkpoint_every=0,  # at each epoch's end: a line per epoch, not one every few steps burying the result
    )
    reporter = Dashboard(title="lorakit example · LoRA fine-tune on task B") if sys.stdout.isatty() else PlainLog()
    Trainer(model, ft_cfg, loss_fn=nn.functional.mse_loss, callbacks=[reporter], artifact_dir=out / TRAIN_DIR).fit(
        train, valid, resume=resume
    )


def _save(model: nn.Module, out: Path, xb: Tensor) -> None:
    """Step 4: save the adapter and list its files' sizes; save a probe of the adapted model's outputs on `xb`."""
    lk.save_adapters(model, out / ADAPTER_DIR)
    files = sorted((out / ADAPTER_DIR).iterdir())
    adapter_bytes, full_bytes = sum(f.stat().st_size for f in files), (out / BASE_FILE).stat().st_size
    say(f"[4/6] adapter saved to {out / ADAPTER_DIR}:")
    sizes = table("file", "bytes", right=("bytes",))
    for f in files:
        sizes.add_row(f.name, f"{f.stat().st_size:,}")
    sizes.add_row("total", f"{adapter_bytes:,}")
    for line in to_text(sizes).splitlines():
        say(f"      {line}")
    say(f"      the adapter is {100 * adapter_bytes / full_bytes:.1f}% of the {full_bytes:,} B full model")
    with torch.no_grad():
        reference = model(xb)
    safetensors_io.write(out / PROBE_FILE, {"x": xb, "y": reference}, {"format": "lorakit-example-probe"})


def check_artifacts(out: str | Path) -> bool:
    """Steps 5 and 6 from files alone: fresh base + saved adapter reproduces the probe; merge within 1e-5."""
    out = Path(out)
    try:
        tensors, _ = safetensors_io.read(out / PROBE_FILE)
        x, reference = tensors["x"], tensors["y"]
        base_state, _ = safetensors_io.read(out / BASE_FILE)
        fresh = SimpleMlp()
        fresh.load_state_dict(base_state)
        lk.load_adapters(fresh, out / ADAPTER_DIR)  # applies the adapter's own config (fc1, fc2)
    except (LoraError, KeyError, RuntimeError, OSError) as e:
        say(f"[5/6] reload FAILED: {e}")
        return False
    fresh.eval()
    with torch.no_grad():
        loaded = fresh(x)
        diff = (loaded - reference).abs().max().item()
        same = torch.equal(loaded, reference)
        say(
            f"[5/6] reloaded (fresh base + adapter) vs trained: max |diff| {diff:.3g} "
            + ("(identical) ok" if same else "FAILED: outputs differ")
        )
        merged = lk.merge(fresh)
        merged_diff = (merged(x) - loaded).abs().max().item()
    plain = not lk.lora_layers(merged)
    merge_ok = plain and merged_diff <= MERGE_TOLERANCE
    say(
        f"[6/6] merged vs unmerged: max |diff| {merged_diff:.3g} (limit {MERGE_TOLERANCE:g}) "
        + ("ok" if merge_ok else "FAILED")
    )
    return same and merge_ok


if __name__ == "__main__":  # python -m lorakit.examples.mlp_example
    sys.exit(run(ExampleOptions()))
