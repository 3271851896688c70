"""A trainer callback writing TensorBoard scalars with torch's SummaryWriter (`pip install lorakit[tensorboard]`).

The scalars are scalars.py's (train/loss, train/lr, train/grad_norm, valid/..., epoch/train_loss); the x axis is
the optimizer step. Event files go to `<artifact_dir>/tensorboard/` unless a log_dir is given; a resumed run
purges the steps after its checkpoint, so the curves show one run, not two overlapping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .events import Event, RunEnded, RunStarted
from .scalars import event_scalars

SUBDIR = "tensorboard"


def _summary_writer() -> Any:
    """torch's SummaryWriter class, or an ImportError saying how to install tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(
            "TensorBoard logging needs the tensorboard package: pip install 'lorakit[tensorboard]'"
        ) from e
    return SummaryWriter


class TensorBoard:
    """Writes a run's scalars as TensorBoard event files; under torchrun, on rank 0 only.

    Args:
        log_dir: where the event files go (None: `<artifact_dir>/tensorboard/` of the Trainer's artifact dir).

    Examples:
        >>> callback = TensorBoard()  # Trainer(..., callbacks=[PlainLog(), callback], artifact_dir="runs/a")
        >>> callback.writer is None  # opened when the run starts
        True
    """

    main_rank_only = True

    def __init__(self, log_dir: str | Path | None = None) -> None:
        self.writer_class = _summary_writer()  # fail now, before training, if tensorboard is missing
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.writer: Any = None

    def __call__(self, e: Event) -> None:
        """Write the scalars of one event."""
        if isinstance(e, RunStarted):
            self._open(e)
        elif self.writer is None:
            return
        elif (scalars := event_scalars(e)) is not None:
            step, values = scalars
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, global_step=step)
        elif isinstance(e, RunEnded):
            self.close()

    def _open(self, e: RunStarted) -> None:
        """Open the writer in the log dir; a resumed run hides the steps after its checkpoint."""
        self.close()
        log_dir = self.log_dir
        if log_dir is None:
            if e.artifact_dir is None:
                raise ValueError("TensorBoard() needs a log_dir, or a Trainer with an artifact_dir to write into")
            log_dir = Path(e.artifact_dir) / SUBDIR
        purge = e.start_step + 1 if e.start_step else None  # events at steps >= purge_step are dropped
        self.writer = self.writer_class(log_dir=str(log_dir), purge_step=purge)

    def close(self) -> None:
        """Flush and close the event file (idempotent)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
