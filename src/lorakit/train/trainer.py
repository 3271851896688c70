"""The training loop: AdamW on the trainable parameters only, a schedule, clipping, accumulation,
bf16 autocast, validation, artifacts, and checkpoints that resume bit-for-bit (on CPU).

Batches are `(inputs, targets)` pairs, scored by `loss_fn(outputs, targets)`, or mappings passed as
`model(**batch)` whose output carries `.loss` (Hugging Face style; `batch["labels"]` are the targets):
see batch.py. The loop never prints: it emits events (events.py) to its callbacks.

Under torchrun the same loop runs on every rank (distributed.py): DDP or FSDP2, a sharded train loader,
metrics summed over ranks; rank 0 alone writes artifacts and runs the reporters.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..fingerprint import Fingerprints
from ..model import trainable_parameters
from . import artifacts as art
from . import rng
from .batch import BatchOut, LossFn, forward, group_size
from .checkpoint import Checkpoint, RunState, resume_from, write_checkpoint
from .config import TrainConfig
from .device import bf16_supported, resolve_device
from .distributed import Group
from .evaluation import Evaluator
from .events import CheckpointSaved, EpochEnded, Evaluated, Event, RunEnded, RunStarted, StepLogged
from .forgetting import ReferenceKL
from .metrics import BatchFn, Meter, Metric, as_metrics
from .plan import RunPlan
from .schedule import adamw, lr_at, param_groups

Callback = Callable[[Event], None]
PLOT_INTERVAL_S = 5.0  # loss.png is redrawn at an epoch's end if this long has passed (a plot costs ~0.25 s)


@dataclass(frozen=True)
class TrainResult:
    """What `Trainer.fit` returns."""

    steps: int
    train_loss: float
    valid_loss: float | None
    best_valid_loss: float | None
    elapsed_s: float
    artifact_dir: Path | None


class Trainer:
    """Train any `nn.Module` (LoRA-wrapped or not) from train/valid DataLoaders.

    Args:
        model: the model; only parameters with `requires_grad` are optimized and checkpointed.
        config: the run's hyper-parameters.
        loss_fn: `loss_fn(outputs, targets) -> scalar`; optional for mapping batches whose output has `.loss`.
        metrics: extra metrics (`[accuracy(), perplexity()]` or `{"mae": fn(outputs, targets)}`).
        callbacks: consumers of events; None picks the dashboard on a terminal, plain logs otherwise.
        artifact_dir: where config.json, metrics.jsonl, loss.png, checkpoints and adapters go (None: nowhere).
            Under torchrun only rank 0 writes there; for `resume` every rank reads its checkpoint.
        reference: a forgetting monitor (`ReferenceKL(loader)`, forgetting.py), measured at every evaluation
            and reported as `kl_ref`.

    Evaluations (epoch ends, and every `config.eval_every` steps) leave the random streams as they found
    them, so validating or monitoring more often never changes what the run trains.

    Examples:
        >>> import lorakit as lk
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> model = lk.apply_lora(net, lk.LoraConfig(rank=2), ["0"])
        >>> x = torch.randn(64, 4); data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
        >>> trainer = Trainer(model, TrainConfig(epochs=2, device="cpu"), loss_fn=nn.functional.mse_loss, callbacks=[])
        >>> result = trainer.fit(data)
        >>> result.steps
        8
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig | None = None,
        *,
        loss_fn: LossFn | None = None,
        metrics: Iterable[Metric] | dict[str, BatchFn] | None = None,
        callbacks: Sequence[Callback] | None = None,
        artifact_dir: str | Path | None = None,
        reference: ReferenceKL | None = None,
    ) -> None:
        self.model = model
        self.reference = reference
        self.config = config or TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a lorakit.train.TrainConfig, got {type(self.config).__name__}")
        self.loss_fn = loss_fn
        self.metrics = as_metrics(metrics)
        self.group, self.device = Group.join(resolve_device(self.config.device))
        self.group.barrier()  # every rank has checked its inputs before rank 0 creates the artifact dir
        if callbacks is None:
            from .reporting import auto_reporter

            callbacks = [auto_reporter()] if self.group.is_main else []
        # reporters speak for the whole run (its numbers are summed over ranks): on rank 0 only
        self.callbacks = [cb for cb in callbacks if self.group.is_main or not getattr(cb, "main_rank_only", False)]
        self.artifact_root = Path(artifact_dir) if artifact_dir is not None else None
        self.artifacts = art.ArtifactDir(artifact_dir) if artifact_dir is not None and self.group.is_main else None
        self.fingerprints = Fingerprints()  # the frozen base's hashes, taken once for every adapter this run saves
        if self.config.precision == "bf16" and not bf16_supported(self.device):
            raise ValueError(f"precision='bf16' is not supported on device {self.device}; use precision='fp32'")

    # -- one batch ----------------------------------------------------------------------------------

    def _forward(self, batch: object, net: nn.Module | None = None) -> BatchOut:
        """One batch through `net` (default: the model); see batch.forward."""
        bf16 = self.config.precision == "bf16"
        return forward(net or self.model, batch, self.device, self.loss_fn, bf16=bf16)

    def _evaluator(self) -> Evaluator:
        """Evaluations as this trainer runs them (its model, device, loss, metrics, precision, monitor)."""
        best = self.artifacts.path(art.BEST_ADAPTER) if self.artifacts else None
        bf16 = self.config.precision == "bf16"
        return Evaluator(
            self.model,
            self.device,
            self.loss_fn,
            self.metrics,
            bf16=bf16,
            reference=self.reference,
            best_adapter=best,
            fingerprints=self.fingerprints,
        )

    def evaluate(self, loader: Iterable[Any]) -> dict[str, float]:
        """Mean loss and metrics over `loader`, in eval mode, without gradients: {"loss": ..., name: ...}.

        Under torchrun every rank evaluates all of `loader` (so every rank gets the same exact numbers).
        """
        return self._evaluator().means(loader)

    # -- the run ------------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        """Hand `event` to every callback."""
        for cb in self.callbacks:
            cb(event)

    def fit(self, train: Iterable[Any], valid: Iterable[Any] | None = None, *, resume: bool = False) -> TrainResult:
        """Train for `config.epochs` (or `config.max_steps`); with `resume=True`, continue from the artifact
        dir's checkpoint.

        A resumed run restores parameters, optimizer, schedule position, every RNG and the position in
        the epoch, so on CPU it ends with the same adapter bytes as an uninterrupted run.
        """
        try:
            return self._fit(train, valid, resume)
        finally:
            for cb in self.callbacks:
                close = getattr(cb, "close", None)
                if callable(close):
                    close()

    def _fit(self, train: Iterable[Any], valid: Iterable[Any] | None, resume: bool) -> TrainResult:
        """`fit` without closing the callbacks."""
        cfg, model, arts, world = self.config, self.model, self.artifacts, self.group
        saving = self.artifact_root is not None  # on every rank (checkpoints gather from all); arts: rank 0
        train = world.shard_loader(train, cfg.seed)
        try:
            batches_per_epoch = len(train)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"train must have a length (a DataLoader over a sized dataset); got {type(train).__name__}"
            ) from None
        plan = RunPlan.of(cfg, batches_per_epoch)
        if world.is_main:
            plan.warn_if_warmup_too_long()
        if cfg.eval_every and valid is None and self.reference is None:
            raise ValueError(
                f"TrainConfig.eval_every={cfg.eval_every} has nothing to evaluate: pass a valid loader "
                "(fit(train, valid)) or a Trainer(reference=ReferenceKL(...))"
            )
        model.to(self.device).train()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("the model has no trainable parameters (apply_lora first, or unfreeze some)")
        net = world.wrap(
            model, self.device, cfg.fsdp, self.fingerprints
        )  # what runs the batches; `model` keeps the names
        optimizer = adamw(param_groups(params, cfg.loraplus_ratio), cfg.lr, cfg.betas, cfg.weight_decay)
        total_steps, evaluator = plan.total_steps, self._evaluator()
        epoch_meter, interval = Meter(self.metrics), Meter(self.metrics)
        s = RunState()
        generator = getattr(train, "generator", None)  # a DataLoader's own shuffle generator, if given
        ckpt: Checkpoint | None = None
        if resume:
            ckpt, s = self._resume(optimizer, epoch_meter, interval)
            if not s.batch:  # checkpoint at an epoch boundary: the live RNG state is all we need
                rng.restore_snapshot(*self._rng(ckpt, "current"), generator)
        else:
            rng.seed_everything(cfg.seed + world.rank)  # ranks draw different dropout masks
            if arts:
                arts.clear_rows()
        trainable, total = trainable_parameters(model)
        if arts:
            facts = {"device": str(self.device), "world_size": world.world_size, "trainable_params": trainable}
            facts |= {"total_params": total, "steps_per_epoch": plan.steps_per_epoch, "total_steps": total_steps}
            arts.write_json(art.CONFIG, {"train": cfg.to_dict(), **facts, "metrics": [m.name for m in self.metrics]})
        where = str(arts.root) if arts else None
        device = str(self.device)
        self._emit(
            RunStarted(
                plan.epochs,
                plan.steps_per_epoch,
                total_steps,
                s.epoch,
                s.step,
                trainable,
                total,
                device,
                cfg.precision,
                where,
            )
        )
        t0, elapsed0, last_plot = time.perf_counter(), s.elapsed_s, time.perf_counter()

        def elapsed() -> float:  # this run's time, and the time of the runs it resumes
            return elapsed0 + time.perf_counter() - t0

        def checkpoint() -> None:  # on every rank: rank 0 writes every rank's RNG state
            s.elapsed_s = elapsed()
            rng_t: dict[str, dict[str, Tensor]] = {}
            rng_json: dict[str, Any] = {}
            for r, states in enumerate(world.gather({"current": rng.snapshot(generator), "epoch_start": epoch_rng})):
                for name, (tensors, data) in states.items():
                    rng_t[rng.rank_key(name, r)], rng_json[rng.rank_key(name, r)] = tensors, data
            if arts:
                state = {
                    **s.to_dict(),
                    "config": cfg.to_dict(),
                    "world_size": world.world_size,
                    "epoch_meter": epoch_meter.state(),
                    "interval": interval.state(),
                    "rng": rng_json,
                }
                path = write_checkpoint(arts.path(art.CHECKPOINT), params, optimizer, rng_t, state)
                self._emit(CheckpointSaved(s.step, str(path)))

        lr = lr_at(s.step, total_steps, cfg.lr, cfg.schedule, cfg.warmup_steps)
        for epoch in range(s.epoch, plan.epochs + 1):
            skip = s.batch if epoch == s.epoch else 0
            if skip:  # mid-epoch resume: replay the epoch's shuffle, then put the live RNG back
                epoch_rng = self._rng(ckpt, "epoch_start")
                rng.restore_snapshot(*epoch_rng, generator)
            else:
                epoch_rng = rng.snapshot(generator)
                epoch_meter.reset()
            set_epoch = getattr(getattr(train, "sampler", None), "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch - 1)  # a DistributedSampler's shuffle for this epoch
            batches = iter(train)
            for _ in itertools.islice(batches, skip):
                pass
            if skip:
                rng.restore_snapshot(*self._rng(ckpt, "current"), generator)
            s.epoch = epoch
            model.train()
            t_interval, units, unit = time.perf_counter(), 0, "samples"
            for b, batch in enumerate(batches, start=skip + 1):
                stepping = b % cfg.grad_accum == 0 or b == batches_per_epoch
                with world.no_sync(net, skip=not stepping):  # ranks average gradients once per step
                    loss, out, y, n, u, unit = self._forward(batch, net)
                    (loss / group_size(b, cfg.grad_accum, batches_per_epoch)).backward()
                sums = epoch_meter.batch_sums(float(loss.detach()), n, out, y)
                *totals, n_all, u_all = world.sum([*sums.values(), n, u])  # the whole step's numbers, every rank
                sums, n, units = dict(zip(sums, totals, strict=True)), int(n_all), units + int(u_all)
                value = sums["loss"] / n
                if not math.isfinite(value):  # every rank sees the same value, so every rank stops here
                    raise FloatingPointError(f"loss is {value} at epoch {epoch}, batch {b}, step {s.step + 1}")
                epoch_meter.add(sums, n)
                interval.add(sums, n)
                if not stepping:
                    continue
                world.average_gradients(params.values())
                lr = lr_at(s.step, total_steps, cfg.lr, cfg.schedule, cfg.warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                if cfg.max_grad_norm is not None:
                    norm = float(torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm))
                    s.grad_norm_sum, s.grad_norms = s.grad_norm_sum + norm, s.grad_norms + 1
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                s.step, s.batch = s.step + 1, b
                ending = plan.ends_epoch(b, s.step)  # the epoch's end evaluates and checkpoints anyway
                if plan.log_due(s.step):
                    now = time.perf_counter()
                    means = interval.means()
                    grad_norm = s.grad_norm_sum / s.grad_norms if s.grad_norms else None
                    rate, mean = units / max(now - t_interval, 1e-9), means.pop("loss")
                    logged = StepLogged(
                        epoch, s.step, b, batches_per_epoch, mean, lr, grad_norm, rate, elapsed(), means, unit
                    )
                    self._row(art.step_row(logged), s)
                    self._emit(logged)
                    interval.reset()
                    s.grad_norm_sum, s.grad_norms, t_interval, units = 0.0, 0, now, 0
                if plan.eval_due(s.step) and not ending:
                    ev = evaluator.during_run(valid, s.best_valid_loss)
                    s.best_valid_loss = ev.best_valid_loss
                    evaluated = Evaluated(
                        epoch, s.step, ev.valid_loss, s.best_valid_loss, ev.is_best, elapsed(), ev.metrics, ev.kl_ref
                    )
                    self._row(art.eval_row(evaluated), s)
                    self._emit(evaluated)
                if saving and plan.checkpoint_due(s.step) and not ending:
                    checkpoint()
                if plan.done(s.step):  # max_steps: the run ends inside this epoch
                    break
            train_means = epoch_meter.means()
            ev = evaluator.during_run(valid, s.best_valid_loss)
            s.train_loss, s.valid_loss, s.best_valid_loss = train_means.pop("loss"), ev.valid_loss, ev.best_valid_loss
            ended = EpochEnded(
                epoch,
                s.step,
                s.train_loss,
                s.valid_loss,
                s.best_valid_loss,
                ev.is_best,
                lr,
                elapsed(),
                train_means,
                ev.metrics,
                ev.kl_ref,
            )
            self._row(art.epoch_row(ended), s)
            self._emit(ended)
            s.epoch, s.batch = epoch + 1, 0
            if saving:
                checkpoint()
            if arts and time.perf_counter() - last_plot >= PLOT_INTERVAL_S:
                arts.plot(arts.rows())
                last_plot = time.perf_counter()
        if arts:
            art.export_adapter(model, arts.path(art.ADAPTER))
            arts.plot(arts.rows())
        self._emit(RunEnded(s.step, elapsed(), s.train_loss, s.valid_loss, s.best_valid_loss, where))
        return TrainResult(
            s.step, s.train_loss, s.valid_loss, s.best_valid_loss, elapsed(), arts.root if arts else None
        )

    def _row(self, row: dict[str, Any], s: RunState) -> None:
        """Append a metrics row (rank 0, with an artifact dir) and count it in the run state."""
        if self.artifacts:
            self.artifacts.append_row(row)
            s.rows += 1

    def _rng(self, ckpt: Checkpoint | None, name: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """This rank's saved RNG state `name` ("current" or "epoch_start")."""
        assert ckpt is not None, "only a resumed run replays saved RNG states"
        key = rng.rank_key(name, self.group.rank)
        return ckpt.rng[key], ckpt.state["rng"][key]

    def _resume(
        self, optimizer: torch.optim.Optimizer, epoch_meter: Meter, interval: Meter
    ) -> tuple[Checkpoint, RunState]:
        """Restore parameters, optimizer, counters and meters from the artifact dir's checkpoint."""
        if self.artifact_root is None:
            raise ValueError("resume=True needs an artifact_dir holding a checkpoint")
        path = self.artifact_root / art.CHECKPOINT
        ckpt, s = resume_from(path, self.config, self.group.world_size, self.model, optimizer)
        epoch_meter.load_state(ckpt.state["epoch_meter"])
        interval.load_state(ckpt.state["interval"])
        if self.artifacts:
            self.artifacts.keep_rows(s.rows)
        return ckpt, s
