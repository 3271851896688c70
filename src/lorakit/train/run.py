"""One training run as `Trainer.fit` drives it: what a run carries from batch to batch (its plan, optimizer,
meters, counters, RNG snapshots and clocks), and its parts in the order they happen: an epoch's start (the
shuffle replayed on a resume), a batch's forward and backward, an optimizer step, the logs, evaluations and
checkpoints due after a step, and the epoch's end.

The trainer builds a `Run` (trainer.py) and calls `epoch` for each epoch; the order of every random draw
and every floating-point operation is what makes a resumed run end with the same bytes as an unbroken one.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import artifacts as art
from . import rng
from .batch import BatchOut, group_size
from .checkpoint import Checkpoint, RunState, write_checkpoint
from .compile import Compiled
from .config import TrainConfig
from .device import saved_activations
from .distributed import Group
from .evaluation import Evaluator
from .events import CheckpointSaved, EpochEnded, Evaluated, Event, StepLogged
from .metrics import Meter
from .plan import RunPlan
from .schedule import lr_at

PLOT_INTERVAL_S = 5.0  # loss.png is redrawn at an epoch's end if this long has passed (a plot costs ~0.25 s)

RngState = tuple[dict[str, Tensor], dict[str, Any]]


@dataclass
class Run:
    """A run in progress: built by `Trainer._start`, advanced an epoch at a time by `epoch`."""

    cfg: TrainConfig
    world: Group
    arts: art.ArtifactDir | None  # rank 0 with an artifact dir
    saving: bool  # on every rank: checkpoints gather from all ranks
    emit: Callable[[Event], None]
    forward: Callable[[object, nn.Module], BatchOut]
    model: nn.Module  # keeps the parameter names
    net: nn.Module  # what runs the batches (the model, or its DDP/FSDP wrapper)
    train: Any
    valid: Iterable[Any] | None
    plan: RunPlan
    batches_per_epoch: int
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    evaluator: Evaluator
    epoch_meter: Meter
    interval: Meter
    s: RunState
    generator: Any  # a DataLoader's own shuffle generator, if given
    ckpt: Checkpoint | None  # the checkpoint a resumed run started from
    where: str | None
    device: torch.device  # where the batches run (activation offloading pins host memory on CUDA)
    lr: float = 0.0
    t0: float = 0.0
    elapsed0: float = 0.0
    last_plot: float = 0.0
    epoch_rng: RngState | None = None  # the RNG state at this epoch's start (replayed by a mid-epoch resume)
    t_interval: float = 0.0  # since the last log: its start, units (samples or tokens) and their name
    units: int = 0
    unit: str = "samples"
    compiled: Compiled | None = None  # the compiled blocks (TrainConfig.compile): their compile time and recompiles

    def start_clock(self) -> None:
        """Start counting this run's time (added to the time of the runs it resumes)."""
        self.t0 = self.last_plot = time.perf_counter()
        self.elapsed0 = self.s.elapsed_s
        self.lr = lr_at(self.s.step, self.plan.total_steps, self.cfg.lr, self.cfg.schedule, self.cfg.warmup_steps)

    def elapsed(self) -> float:
        """This run's time, and the time of the runs it resumes."""
        return self.elapsed0 + time.perf_counter() - self.t0

    def saved_rng(self, name: str) -> RngState:
        """This rank's saved RNG state `name` ("current" or "epoch_start")."""
        assert self.ckpt is not None, "only a resumed run replays saved RNG states"
        key = rng.rank_key(name, self.world.rank)
        return self.ckpt.rng[key], self.ckpt.state["rng"][key]

    def row(self, row: dict[str, Any]) -> None:
        """Append a metrics row (rank 0, with an artifact dir) and count it in the run state."""
        if self.arts:
            self.arts.append_row(row)
            self.s.rows += 1

    # -- an epoch -----------------------------------------------------------------------------------

    def epoch(self, epoch: int) -> None:
        """Train epoch `epoch` (from where a resumed run stopped in it), then evaluate and checkpoint."""
        batches, skip = self._begin_epoch(epoch)
        for b, batch in enumerate(batches, start=skip + 1):
            if not self._accumulate(epoch, b, batch):
                continue
            self._step(b)
            if self._after_step(epoch, b):  # max_steps: the run ends inside this epoch
                break
        self._end_epoch(epoch)

    def _begin_epoch(self, epoch: int) -> tuple[Iterator[Any], int]:
        """The epoch's batches (past those a mid-epoch resume already did) and how many were skipped."""
        s, generator = self.s, self.generator
        skip = s.batch if epoch == s.epoch else 0
        if skip:  # mid-epoch resume: replay the epoch's shuffle, then put the live RNG back
            self.epoch_rng = self.saved_rng("epoch_start")
            rng.restore_snapshot(*self.epoch_rng, generator)
        else:
            self.epoch_rng = rng.snapshot(generator)
            self.epoch_meter.reset()
        set_epoch = getattr(getattr(self.train, "sampler", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch - 1)  # a DistributedSampler's shuffle for this epoch
        batches = iter(self.train)
        for _ in itertools.islice(batches, skip):
            pass
        if skip:
            rng.restore_snapshot(*self.saved_rng("current"), generator)
        s.epoch = epoch
        self.model.train()
        self.t_interval, self.units, self.unit = time.perf_counter(), 0, "samples"
        return batches, skip

    def _accumulate(self, epoch: int, b: int, batch: object) -> bool:
        """Forward and backward batch `b`, its numbers summed over ranks into the meters; True if a step is due."""
        cfg, world = self.cfg, self.world
        stepping = b % cfg.grad_accum == 0 or b == self.batches_per_epoch
        with world.no_sync(self.net, skip=not stepping):  # ranks average gradients once per step
            with saved_activations(cfg.offload_activations, self.device):  # what forward saves for backward
                loss, out, y, n, u, self.unit = self.forward(batch, self.net)
            (loss / group_size(b, cfg.grad_accum, self.batches_per_epoch)).backward()
        sums = self.epoch_meter.batch_sums(float(loss.detach()), n, out, y)
        *totals, n_all, u_all = world.sum([*sums.values(), n, u])  # the whole step's numbers, every rank
        sums, n, self.units = dict(zip(sums, totals, strict=True)), int(n_all), self.units + int(u_all)
        value = sums["loss"] / n
        if not math.isfinite(value):  # every rank sees the same value, so every rank stops here
            raise FloatingPointError(f"loss is {value} at epoch {epoch}, batch {b}, step {self.s.step + 1}")
        self.epoch_meter.add(sums, n)
        self.interval.add(sums, n)
        return stepping

    def _step(self, b: int) -> None:
        """One optimizer step: gradients averaged over ranks, the schedule's lr, clipping; batch `b` ends it."""
        cfg, s = self.cfg, self.s
        self.world.average_gradients(self.params.values())
        self.lr = lr_at(s.step, self.plan.total_steps, cfg.lr, cfg.schedule, cfg.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)
        if cfg.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params.values(), cfg.max_grad_norm))
            s.grad_norm_sum, s.grad_norms = s.grad_norm_sum + norm, s.grad_norms + 1
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        s.step, s.batch = s.step + 1, b

    def _after_step(self, epoch: int, b: int) -> bool:
        """The log, evaluation and checkpoint due after this step; True when the run's last step is done."""
        s, plan = self.s, self.plan
        ending = plan.ends_epoch(b, s.step)  # the epoch's end evaluates and checkpoints anyway
        if plan.log_due(s.step):
            self._log(epoch, b)
        if plan.eval_due(s.step) and not ending:
            ev = self.evaluator.during_run(self.valid, s.best_valid_loss)
            s.best_valid_loss = ev.best_valid_loss
            evaluated = Evaluated(
                epoch,
                s.step,
                ev.valid_loss,
                s.best_valid_loss,
                ev.is_best,
                self.elapsed(),
                ev.metrics,
                ev.kl_ref,
                ev.samples,
            )
            self.row(art.eval_row(evaluated))
            self.emit(evaluated)
        if self.saving and plan.checkpoint_due(s.step) and not ending:
            self.checkpoint()
        return plan.done(s.step)

    def _log(self, epoch: int, b: int) -> None:
        """Log the steps since the last log: mean loss and metrics, lr, mean gradient norm, throughput."""
        s = self.s
        now = time.perf_counter()
        means = self.interval.means()
        grad_norm = s.grad_norm_sum / s.grad_norms if s.grad_norms else None
        rate, mean = self.units / max(now - self.t_interval, 1e-9), means.pop("loss")
        c = self.compiled
        logged = StepLogged(
            epoch, s.step, b, self.batches_per_epoch, mean, self.lr, grad_norm, rate, self.elapsed(), means, self.unit
        )
        if c is not None:
            logged = dataclasses.replace(logged, compile_s=c.compile_s, recompiles=c.recompiles)
        self.row(art.step_row(logged))
        self.emit(logged)
        self.interval.reset()
        s.grad_norm_sum, s.grad_norms, self.t_interval, self.units = 0.0, 0, now, 0

    def _end_epoch(self, epoch: int) -> None:
        """The epoch's train means and evaluation, then a checkpoint and (now and then) the loss plot."""
        s, arts = self.s, self.arts
        train_means = self.epoch_meter.means()
        ev = self.evaluator.during_run(self.valid, s.best_valid_loss)
        s.train_loss, s.valid_loss, s.best_valid_loss = train_means.pop("loss"), ev.valid_loss, ev.best_valid_loss
        ended = EpochEnded(
            epoch,
            s.step,
            s.train_loss,
            s.valid_loss,
            s.best_valid_loss,
            ev.is_best,
            self.lr,
            self.elapsed(),
            train_means,
            ev.metrics,
            ev.kl_ref,
            ev.samples,
        )
        self.row(art.epoch_row(ended))
        self.emit(ended)
        s.epoch, s.batch = epoch + 1, 0
        if self.saving:
            self.checkpoint()
        if arts and time.perf_counter() - self.last_plot >= PLOT_INTERVAL_S:
            arts.plot(arts.rows())
            self.last_plot = time.perf_counter()

    def checkpoint(self) -> None:
        """Write the checkpoint; on every rank, as rank 0 writes every rank's RNG state."""
        s = self.s
        s.elapsed_s = self.elapsed()
        rng_t: dict[str, dict[str, Tensor]] = {}
        rng_json: dict[str, Any] = {}
        assert self.epoch_rng is not None, "a checkpoint is written inside an epoch"
        states = {"current": rng.snapshot(self.generator), "epoch_start": self.epoch_rng}
        for r, gathered in enumerate(self.world.gather(states)):
            for name, (tensors, data) in gathered.items():
                rng_t[rng.rank_key(name, r)], rng_json[rng.rank_key(name, r)] = tensors, data
        if self.arts:
            state = {
                **s.to_dict(),
                "config": self.cfg.to_dict(),
                "world_size": self.world.world_size,
                "epoch_meter": self.epoch_meter.state(),
                "interval": self.interval.state(),
                "rng": rng_json,
            }
            path = write_checkpoint(self.arts.path(art.CHECKPOINT), self.params, self.optimizer, rng_t, state)
            self.emit(CheckpointSaved(s.step, str(path)))
