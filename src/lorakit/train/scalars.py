"""The scalars a run's events carry, named as every tracker logs them (TensorBoard, MLflow, Weights & Biases).

    train/loss, train/lr, train/grad_norm, train/<metric>     every logged step (StepLogged)
    valid/loss, valid/<metric>, valid/kl_ref                   every evaluation (Evaluated, and epoch ends)
    epoch/train_loss                                           every epoch end (EpochEnded)

The x axis is the optimizer step. A value the event does not have (no grad norm, no valid loader) is left out.
"""

from __future__ import annotations

from .events import EpochEnded, Evaluated, Event, RunStarted, StepLogged


def event_scalars(e: Event) -> tuple[int, dict[str, float]] | None:
    """(step, {tag: value}) of the event's scalars, or None for an event without any.

    Examples:
        >>> from lorakit.train import StepLogged
        >>> event_scalars(StepLogged(1, 10, 10, 20, loss=0.5, lr=1e-3, grad_norm=None, throughput=1.0, elapsed_s=1.0))
        (10, {'train/loss': 0.5, 'train/lr': 0.001})
    """
    if isinstance(e, StepLogged):
        scalars = {"train/loss": e.loss, "train/lr": e.lr, "train/grad_norm": e.grad_norm}
        return e.step, _known(scalars | {f"train/{k}": v for k, v in e.metrics.items()})
    if isinstance(e, Evaluated):
        return e.step, _valid(e.valid_loss, e.metrics, e.kl_ref)
    if isinstance(e, EpochEnded):
        return e.step, {"epoch/train_loss": e.train_loss} | _valid(e.valid_loss, e.valid_metrics, e.kl_ref)
    return None


def run_params(e: RunStarted) -> dict[str, object]:
    """What a tracker records of the run itself: its size, device and precision (the job's flags come beside)."""
    return {
        "epochs": e.epochs,
        "steps_per_epoch": e.steps_per_epoch,
        "total_steps": e.total_steps,
        "start_step": e.start_step,
        "trainable_params": e.trainable_params,
        "total_params": e.total_params,
        "device": e.device,
        "precision": e.precision,
    }


def _valid(loss: float | None, metrics: dict[str, float], kl_ref: float | None) -> dict[str, float]:
    """One evaluation's scalars."""
    return _known({"valid/loss": loss, "valid/kl_ref": kl_ref} | {f"valid/{k}": v for k, v in metrics.items()})


def _known(scalars: dict[str, float | None]) -> dict[str, float]:
    """The scalars that have a value."""
    return {tag: float(value) for tag, value in scalars.items() if value is not None}
