"""When things happen in a run: how many steps and epochs, and at which steps it logs, evaluates, checkpoints
and stops. Pure arithmetic on the optimizer step, so a resumed run makes the same decisions.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from .config import TrainConfig


@dataclass(frozen=True)
class RunPlan:
    """A run's shape: `epochs` passes of `steps_per_epoch` steps, ending at step `total_steps`.

    With `config.max_steps` the run stops after that many optimizer steps, whatever `config.epochs` says
    (as transformers' `max_steps` does): the data is read again as often as needed, and the last epoch
    may end early. `epochs` is then the number of epochs the run touches.

    Examples:
        >>> plan = RunPlan.of(TrainConfig(max_steps=10, eval_every=4), batches_per_epoch=6)
        >>> plan.epochs, plan.total_steps, [s for s in range(1, 11) if plan.eval_due(s)]
        (2, 10, [4, 8])
    """

    config: TrainConfig
    batches_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int

    @classmethod
    def of(cls, config: TrainConfig, batches_per_epoch: int) -> RunPlan:
        """The plan of `config` over a loader of `batches_per_epoch` batches (>= 1)."""
        if batches_per_epoch < 1:
            raise ValueError("the train loader yields no batches")
        steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
        if config.max_steps is not None:
            total_steps = config.max_steps
            epochs = math.ceil(total_steps / steps_per_epoch)
        else:
            epochs, total_steps = config.epochs, steps_per_epoch * config.epochs
        return cls(config, batches_per_epoch, steps_per_epoch, epochs, total_steps)

    def warn_if_warmup_too_long(self) -> None:
        """A UserWarning when warm-up does not end before the run does (the lr never reaches its peak)."""
        warmup = self.config.warmup_steps
        if warmup and warmup >= self.total_steps:
            warnings.warn(
                f"warmup_steps={warmup} is not shorter than the run's {self.total_steps} optimizer steps: the "
                f"learning rate never reaches its peak lr={self.config.lr:g} (lower warmup_steps, or train longer)",
                UserWarning,
                stacklevel=4,  # the caller of Trainer.fit
            )

    def done(self, step: int) -> bool:
        """Whether the run has taken all its steps."""
        return step >= self.total_steps

    def ends_epoch(self, batch: int, step: int) -> bool:
        """Whether the optimizer step after `batch` (1-based) ends the epoch: its last batch, or the run's last step."""
        return batch == self.batches_per_epoch or self.done(step)

    def log_due(self, step: int) -> bool:
        """Whether step `step` writes a step row and log line."""
        return step % self.config.log_every == 0

    def eval_due(self, step: int) -> bool:
        """Whether step `step` is an `eval_every` evaluation (epoch ends evaluate anyway)."""
        every = self.config.eval_every or 0
        return every > 0 and step % every == 0

    def checkpoint_due(self, step: int) -> bool:
        """Whether step `step` is a `checkpoint_every` checkpoint (epoch ends checkpoint anyway)."""
        every = self.config.checkpoint_every
        return every > 0 and step % every == 0
