"""A trainer callback logging a run to Weights & Biases (`pip install 'lorakit[track]'`).

The metrics are scalars.py's (train/loss, train/lr, train/grad_norm, valid/..., epoch/train_loss) at the optimizer
step; the run's config is its size, device and precision (scalars.run_params) and the `params` given (the CLI
passes every flag). Offline unless configured: `WANDB_MODE` is honoured (`online` with `wandb login` syncs as it
goes), else the run is written offline under `<artifact_dir>/wandb/` (`wandb sync` uploads it later). Each start,
a resume too, is a new W&B run with the step it starts at in its config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .events import Event, RunEnded, RunStarted
from .scalars import event_scalars, run_params

PROJECT = "lorakit"


def _wandb() -> Any:
    """The wandb module, or an ImportError saying how to install it."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError("Weights & Biases logging needs wandb: pip install 'lorakit[track]' (or wandb)") from e
    return wandb


class WandB:
    """Logs a run's metrics and config to Weights & Biases (offline by default); under torchrun, on rank 0 only.

    Args:
        params: the run's settings to record in the W&B config (None values are left out).
        project: the W&B project.
        directory: where wandb writes (None: the artifact dir; the run goes to its `wandb/`).
        run_name: the W&B run's name (None: the artifact dir's parent, the run's OUT).

    Examples:
        >>> callback = WandB({"rank": 8})  # Trainer(..., callbacks=[PlainLog(), callback], artifact_dir="runs/a")
        >>> callback.run is None  # started when the run starts
        True
    """

    main_rank_only = True

    def __init__(
        self,
        params: Mapping[str, object] | None = None,
        project: str = PROJECT,
        directory: str | Path | None = None,
        run_name: str | None = None,
    ) -> None:
        self.wandb = _wandb()  # fail now, before training, if wandb is missing
        self.params = {k: v for k, v in (params or {}).items() if v is not None}
        self.project, self.directory, self.run_name = project, directory, run_name
        self.run: Any = None

    def __call__(self, e: Event) -> None:
        """Log the metrics of one event."""
        if isinstance(e, RunStarted):
            self._open(e)
        elif self.run is None:
            return
        elif (scalars := event_scalars(e)) is not None:
            step, values = scalars
            self.run.log(values, step=step)
        elif isinstance(e, RunEnded):
            self.close()

    def _open(self, e: RunStarted) -> None:
        """Start the W&B run (offline unless WANDB_MODE says otherwise) with the run's config."""
        self.close()
        directory = self.directory if self.directory is not None else e.artifact_dir
        if directory is None:
            raise ValueError("WandB() needs a directory, or a Trainer with an artifact_dir to write into")
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(
            project=self.project,
            name=self.run_name or (Path(e.artifact_dir).parent.name if e.artifact_dir else None),
            dir=str(directory),
            mode=os.environ.get("WANDB_MODE") or "offline",
            config=self.params | run_params(e),
            settings=self.wandb.Settings(silent=True, console="off", x_disable_stats=True),
            reinit="create_new",
        )

    def close(self) -> None:
        """Finish the W&B run (idempotent)."""
        if self.run is not None:
            self.run.finish()
            self.run = None
