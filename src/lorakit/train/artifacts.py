"""A run's artifact directory: config.json, metrics.jsonl, loss.png, checkpoint and adapters.

    config.json               the TrainConfig plus run facts (device, parameter counts, steps)
    metrics.jsonl             one JSON object per line; "kind" is "step", "eval" or "epoch" (schema below)
    loss.png                  train (per logged step) and valid (per evaluation) loss; at the end, and after
                              an epoch when 5 s have passed since the last drawing
    checkpoint.safetensors    the latest training checkpoint (see checkpoint.py)
    adapter/                  the final adapter (lorakit.save_adapters: PEFT layout)
    best_adapter/             the adapter of the evaluation (epoch end or eval_every) with the lowest valid loss
    tensorboard/              event files, when the run has a tensorboard.TensorBoard callback

metrics.jsonl rows:
    {"kind": "step", "epoch", "step", "batch", "loss", "lr", "grad_norm", "throughput", "elapsed_s", "<metric>"...}
    {"kind": "eval", "epoch", "step", "valid_loss", "best_valid_loss", "is_best", "elapsed_s", "valid_<metric>"...,
     "kl_ref"}                                                 (every eval_every steps, inside an epoch)
    {"kind": "epoch", "epoch", "step", "train_loss", "valid_loss", "best_valid_loss", "is_best", "lr",
     "elapsed_s", "train_<metric>"..., "valid_<metric>"..., "kl_ref"}
"kl_ref" is there when the Trainer has a reference monitor (forgetting.py). Probes (evaluation.Probe) add their
metrics as "valid_<name>" and their samples as "samples": [{...}, ...] to "eval" and "epoch" rows (finetune's
eval metrics: {"row", "prompt", "reference", "generation", "scores": {metric: 0 or 1}}).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from torch import nn

from ..files import atomic
from ..files import safetensors as safetensors_io
from ..fingerprint import Fingerprints
from ..model import lora_layers
from ..saving import save_adapters
from .events import EpochEnded, Evaluated, StepLogged

CONFIG = "config.json"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
CHECKPOINT = "checkpoint.safetensors"
ADAPTER = "adapter"
BEST_ADAPTER = "best_adapter"


class ArtifactDir:
    """Paths and writers for one run's directory; every whole-file write is atomic."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        """A file or folder in the run directory."""
        return self.root / name

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        """Write `data` as indented JSON, atomically."""
        atomic.write_json(self.path(name), data)

    def append_row(self, row: dict[str, Any]) -> None:
        """Append one metrics row (one line, flushed)."""
        with open(self.path(METRICS), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        """Every complete row of metrics.jsonl (a torn last line from a killed run is skipped)."""
        p = self.path(METRICS)
        if not p.exists():
            return []
        out = []
        for line in p.read_text(encoding="utf-8").splitlines(keepends=True):
            if line.endswith("\n"):
                out.append(json.loads(line))
        return out

    def keep_rows(self, n: int) -> list[dict[str, Any]]:
        """Cut metrics.jsonl back to its first `n` rows (what a resumed checkpoint had written)."""
        rows = self.rows()[:n]
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        atomic.atomic_write(self.path(METRICS), data)
        return rows

    def clear_rows(self) -> None:
        """Start metrics.jsonl empty (a fresh run in a used directory)."""
        atomic.atomic_write(self.path(METRICS), b"")

    def plot(self, rows: list[dict[str, Any]], title: str = "train and valid loss") -> Path:
        """Draw loss.png from metrics rows: train loss per logged step and per epoch, valid loss per evaluation."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
        from matplotlib.figure import Figure

        steps = [r for r in rows if r["kind"] == "step"]
        epochs = [r for r in rows if r["kind"] == "epoch"]
        evals = [r for r in rows if r["kind"] in ("eval", "epoch") and r.get("valid_loss") is not None]
        fig = Figure(figsize=(7, 4), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if steps:
            ax.plot(
                [r["step"] for r in steps],
                [r["loss"] for r in steps],
                color="tab:blue",
                alpha=0.45,
                linewidth=1,
                label="train (logged steps)",
            )
        if epochs:
            ax.plot(
                [r["step"] for r in epochs],
                [r["train_loss"] for r in epochs],
                "o-",
                color="tab:blue",
                label="train (epoch mean)",
            )
        if evals:
            ax.plot(
                [r["step"] for r in evals], [r["valid_loss"] for r in evals], "s-", color="tab:orange", label="valid"
            )
        losses = [r["loss"] for r in steps] + [r["train_loss"] for r in epochs]
        if losses and min(losses) > 0 and max(losses) / min(losses) > 20:
            ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if steps or epochs:
            ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic.atomic_write(self.path(PLOT), buf.getvalue())
        return self.path(PLOT)


def step_row(e: StepLogged) -> dict[str, Any]:
    """The metrics.jsonl row of a logged step."""
    return {
        "kind": "step",
        "epoch": e.epoch,
        "step": e.step,
        "batch": e.batch,
        "loss": e.loss,
        "lr": e.lr,
        "grad_norm": e.grad_norm,
        "throughput": e.throughput,
        "throughput_unit": e.unit,
        "elapsed_s": e.elapsed_s,
        **e.metrics,
        **({"compile_s": e.compile_s, "recompiles": e.recompiles} if e.compile_s is not None else {}),
    }


def _kl(kl_ref: float | None) -> dict[str, float]:
    """The row's "kl_ref" entry, when measured."""
    return {} if kl_ref is None else {"kl_ref": kl_ref}


def _samples(samples: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """The row's "samples" entry, when a probe gave some."""
    return {"samples": list(samples)} if samples else {}


def eval_row(e: Evaluated) -> dict[str, Any]:
    """The metrics.jsonl row of an `eval_every` evaluation."""
    return {
        "kind": "eval",
        "epoch": e.epoch,
        "step": e.step,
        "valid_loss": e.valid_loss,
        "best_valid_loss": e.best_valid_loss,
        "is_best": e.is_best,
        "elapsed_s": e.elapsed_s,
        **{f"valid_{k}": v for k, v in e.metrics.items()},
        **_kl(e.kl_ref),
        **_samples(e.samples),
    }


def epoch_row(e: EpochEnded) -> dict[str, Any]:
    """The metrics.jsonl row of an epoch's end."""
    return {
        "kind": "epoch",
        "epoch": e.epoch,
        "step": e.step,
        "train_loss": e.train_loss,
        "valid_loss": e.valid_loss,
        "best_valid_loss": e.best_valid_loss,
        "is_best": e.is_best,
        "lr": e.lr,
        "elapsed_s": e.elapsed_s,
        **{f"train_{k}": v for k, v in e.train_metrics.items()},
        **{f"valid_{k}": v for k, v in e.valid_metrics.items()},
        **_kl(e.kl_ref),
        **_samples(e.samples),
    }


def export_adapter(model: nn.Module, directory: Path, fingerprints: Fingerprints | None = None) -> Path:
    """Save what training changed: the PEFT-layout adapter for a LoRA model, else the trainable parameters.

    `fingerprints` keeps the base's hashes across saves (`lorakit.fingerprint.Fingerprints`)."""
    if lora_layers(model):
        return save_adapters(model, directory, fingerprints=fingerprints)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    safetensors_io.write(directory / "trainable.safetensors", trainable, {"format": "lorakit-trainable"})
    return directory
