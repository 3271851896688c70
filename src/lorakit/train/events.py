"""The typed events a training run emits; dashboards, loggers and user callbacks consume them.

A callback is any `Callable[[Event], None]`. The trainer never prints: whatever is shown comes from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RunStarted:
    """Once, before the first step (also on resume, with `start_step` > 0)."""

    epochs: int
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


@dataclass(frozen=True)
class EpochEnded:
    """After each epoch's validation."""

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


@dataclass(frozen=True)
class CheckpointSaved:
    """A checkpoint (and, at an epoch end, possibly the best adapter) was written atomically."""

    step: int
    path: str


@dataclass(frozen=True)
class RunEnded:
    """Once, after the last epoch."""

    step: int
    elapsed_s: float
    train_loss: float
    valid_loss: float | None
    best_valid_loss: float | None
    artifact_dir: str | None


Event = RunStarted | StepLogged | EpochEnded | CheckpointSaved | RunEnded
