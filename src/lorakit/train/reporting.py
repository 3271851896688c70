"""Plain one-line-per-interval logs (CI, pipes, files), and the choice between them and the dashboard.

Every line is `<kind> key=value ...`, with no colour or cursor codes, so `grep '^epoch'` or
`awk` can read a run's log.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

import torch

from ..ui.fmt import fmt_duration
from .device import peak_memory_mib
from .events import CheckpointSaved, EpochEnded, Evaluated, Event, RunEnded, RunStarted, StepLogged

if TYPE_CHECKING:
    from .dashboard import Dashboard


def _metrics(prefix: str, values: dict[str, float]) -> str:
    """` <prefix><name>=<value>` for each metric, for a log line."""
    return "".join(f" {prefix}{k}={v:.6g}" for k, v in values.items())


def _optional(name: str, value: float | None) -> str:
    """` <name>=<value>`, or nothing for None."""
    return f" {name}={value:.6g}" if value is not None else ""


class PlainLog:
    """Writes one greppable line per event to `stream` (stdout by default); under torchrun, on rank 0 only."""

    main_rank_only = True  # the Trainer leaves it out on other ranks: their numbers are the same

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.device = torch.device("cpu")
        self.epochs = self.total_steps = 0
        self.recompiles: int | None = None  # the compile fields are logged when they change, not on every line

    def _write(self, line: str) -> None:
        """One log line, flushed."""
        stream = self.stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()

    def _mem(self) -> str:
        """Peak memory so far, as a log field."""
        mib, kind = peak_memory_mib(self.device)
        return f"mem_{kind}_mib={mib:.0f}"

    def __call__(self, e: Event) -> None:
        """Log one event."""
        if isinstance(e, RunStarted):
            self.device, self.epochs, self.total_steps = torch.device(e.device), e.epochs, e.total_steps
            pct = 100 * e.trainable_params / max(e.total_params, 1)
            resumed = f" resumed_at_step={e.start_step}" if e.start_step else ""
            self._write(
                f"start device={e.device} precision={e.precision} epochs={e.epochs} "
                f"steps={e.total_steps} steps_per_epoch={e.steps_per_epoch} trainable={e.trainable_params} "
                f"total={e.total_params} trainable_pct={pct:.2f}{resumed} artifacts={e.artifact_dir}"
            )
        elif isinstance(e, StepLogged):
            norm = f" grad_norm={e.grad_norm:.4g}" if e.grad_norm is not None else ""
            if e.compile_s is not None and e.recompiles != self.recompiles:
                norm += f" compile_s={e.compile_s:.1f} recompiles={e.recompiles}"
                self.recompiles = e.recompiles
            self._write(
                f"step epoch={e.epoch}/{self.epochs} step={e.step}/{self.total_steps} loss={e.loss:.6g} "
                f"lr={e.lr:.3e}{norm}{_metrics('', e.metrics)} {e.unit}_per_s={e.throughput:.0f} "
                f"elapsed={fmt_duration(e.elapsed_s)} {self._mem()}"
            )
        elif isinstance(e, Evaluated):
            self._write(
                f"eval epoch={e.epoch}/{self.epochs} step={e.step}/{self.total_steps}"
                f"{_optional('valid_loss', e.valid_loss)}{_optional('best_valid_loss', e.best_valid_loss)}"
                f"{' best=yes' if e.is_best else ''}{_metrics('valid_', e.metrics)}{_optional('kl_ref', e.kl_ref)} "
                f"elapsed={fmt_duration(e.elapsed_s)} {self._mem()}"
            )
        elif isinstance(e, EpochEnded):
            self._write(
                f"epoch epoch={e.epoch}/{self.epochs} step={e.step}/{self.total_steps} "
                f"train_loss={e.train_loss:.6g}{_optional('valid_loss', e.valid_loss)}"
                f"{_optional('best_valid_loss', e.best_valid_loss)}{' best=yes' if e.is_best else ''}"
                f"{_metrics('train_', e.train_metrics)}{_metrics('valid_', e.valid_metrics)}"
                f"{_optional('kl_ref', e.kl_ref)} lr={e.lr:.3e} elapsed={fmt_duration(e.elapsed_s)} {self._mem()}"
            )
        elif isinstance(e, CheckpointSaved):
            self._write(f"checkpoint step={e.step} path={e.path}")
        elif isinstance(e, RunEnded):
            self._write(
                f"done steps={e.step} train_loss={e.train_loss:.6g}{_optional('valid_loss', e.valid_loss)} "
                f"elapsed={fmt_duration(e.elapsed_s)} {self._mem()} artifacts={e.artifact_dir}"
            )


def auto_reporter(stream: TextIO | None = None) -> Dashboard | PlainLog:
    """The live dashboard when `stream` (stdout) is a terminal, else `PlainLog`."""
    out = stream or sys.stdout
    if out.isatty():
        from .dashboard import Dashboard

        return Dashboard()
    return PlainLog(stream)
