"""The typed events a training run emits; dashboards, loggers and user callbacks consume them.

A callback is any `Callable[[Event], None]`. The trainer never prints: whatever is shown comes from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunStarted:
    """Once, before the first step (also on resume, with `start_step` > 0)."""

    epochs: int  # epochs the run touches (with max_steps: enough to take them, the last maybe partial)
    steps_per_epoch: int
    total_steps: int
    start_epoch: int  # 1-based epoch the run (re)starts in
    start_step: int  # optimizer steps already done (0 unless resumed)
    trainable_params: int
    total_params: int
    device: str
    precision: str
    artifact_dir: str | None


@dataclass(frozen=True)
class StepLogged:
    """Every `log_every` optimizer steps: the means over the steps since the last one."""

    epoch: int
    step: int  # optimizer steps done so far
    batch: int  # micro-batches done in this epoch
    batches_per_epoch: int
    loss: float
    lr: float
    grad_norm: float | None
    throughput: float  # samples (or tokens) per second over the interval
    elapsed_s: float
    metrics: dict[str, float] = field(default_factory=dict)
    unit: str = "samples"  # what throughput counts: "samples" or "tokens"
    compile_s: float | None = None  # compiled blocks (TrainConfig.compile): seconds spent compiling so far
    recompiles: int | None = None  # and graphs compiled after the first batch (new lengths, eval's no-grad)


@dataclass(frozen=True)
class Evaluated:
    """Every `eval_every` optimizer steps, inside an epoch: validation (and the reference KL) at that step.

    An evaluation that falls on an epoch's last step is that epoch's own (EpochEnded), not an Evaluated.
    """

    epoch: int
    step: int
    valid_loss: float | None  # None when the run has no valid loader (only the reference KL)
    best_valid_loss: float | None  # the lowest over every evaluation so far, this one included
    is_best: bool  # this evaluation's adapter became best_adapter/
    elapsed_s: float
    metrics: dict[str, float] = field(default_factory=dict)  # the valid metrics
    kl_ref: float | None = None  # mean per-token KL(adapted ‖ base) on the reference text (forgetting.py)
    samples: tuple[dict[str, Any], ...] = ()  # the probes' samples (e.g. generated answers with their scores)


@dataclass(frozen=True)
class EpochEnded:
    """After each epoch's validation (the last epoch of a `max_steps` run may be partial)."""

    epoch: int
    step: int
    train_loss: float
    valid_loss: float | None
    best_valid_loss: float | None
    is_best: bool
    lr: float
    elapsed_s: float
    train_metrics: dict[str, float] = field(default_factory=dict)
    valid_metrics: dict[str, float] = field(default_factory=dict)
    kl_ref: float | None = None  # as in Evaluated, measured at this epoch's end
    samples: tuple[dict[str, Any], ...] = ()  # as in Evaluated


@dataclass(frozen=True)
class CheckpointSaved:
    """A checkpoint (and, at an epoch end, possibly the best adapter) was written atomically."""

    step: int
    path: str


@dataclass(frozen=True)
class RunEnded:
    """Once, after the last epoch (or the `max_steps`-th step)."""

    step: int
    elapsed_s: float
    train_loss: float
    valid_loss: float | None
    best_valid_loss: float | None
    artifact_dir: str | None


Event = RunStarted | StepLogged | Evaluated | EpochEnded | CheckpointSaved | RunEnded
