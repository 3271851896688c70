"""The training loop: AdamW on the trainable parameters only, a schedule, clipping, accumulation,
bf16 autocast, validation, artifacts, and checkpoints that resume bit-for-bit (on CPU).

Batches are `(inputs, targets)` pairs, scored by `loss_fn(outputs, targets)`, or mappings passed as
`model(**batch)` whose output carries `.loss` (Hugging Face style; `batch["labels"]` are the targets):
see batch.py. The loop never prints: it emits events (events.py) to its callbacks.

Under torchrun the same loop runs on every rank (distributed.py): DDP or FSDP2, a sharded train loader,
metrics summed over ranks; rank 0 alone writes artifacts and runs the reporters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fingerprint import Fingerprints
from ..model import trainable_parameters
from . import artifacts as art
from . import rng
from .batch import BatchOut, LossFn, Objective, forward
from .checkpoint import Checkpoint, RunState, resume_from
from .compile import Compiled, compile_blocks, compile_unsupported
from .config import TrainConfig
from .device import bf16_supported, check_offload, resolve_device
from .distributed import Group
from .evaluation import Evaluator, Probe
from .events import Event, RunEnded, RunStarted
from .forgetting import ReferenceKL
from .metrics import BatchFn, Meter, Metric, as_metrics
from .plan import RunPlan
from .run import Run
from .schedule import adamw, param_groups

Callback = Callable[[Event], None]


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
        objective: scores each batch instead of `loss_fn` (batch.Objective): what DPO and GRPO train with.
        probes: measured at every evaluation (`evaluation.Probe`, e.g. hf/answers.py's scores of generated
            answers); their metrics join the valid metrics, their samples go into metrics.jsonl rows.

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
        probes: Sequence[Probe] = (),
        objective: Objective | None = None,
    ) -> None:
        self.model = model
        self.objective = objective
        self.reference = reference
        self.probes = list(probes)
        self.config = config or TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a lorakit.train.TrainConfig, got {type(self.config).__name__}")
        self.loss_fn = loss_fn
        self.metrics = as_metrics(metrics)
        self.group, self.device = Group.join(resolve_device(self.config.device))
        check_offload(self.config.offload_activations, self.device)  # before anything is written
        self.group.barrier()  # every rank has checked its inputs before rank 0 creates the artifact dir
        if callbacks is None:
            from .reporting import auto_reporter

            callbacks = [auto_reporter()] if self.group.is_main else []
        # reporters speak for the whole run (its numbers are summed over ranks): on rank 0 only
        self.callbacks = [cb for cb in callbacks if self.group.is_main or not getattr(cb, "main_rank_only", False)]
        self.artifact_root = Path(artifact_dir) if artifact_dir is not None else None
        self.artifacts = art.ArtifactDir(artifact_dir) if artifact_dir is not None and self.group.is_main else None
        self.compiled: Compiled | None = None  # the compiled blocks, once a run with config.compile started
        self.fingerprints = Fingerprints()  # the frozen base's hashes, taken once for every adapter this run saves
        if self.config.precision == "bf16" and not bf16_supported(self.device):
            raise ValueError(f"precision='bf16' is not supported on device {self.device}; use precision='fp32'")

    # -- one batch ----------------------------------------------------------------------------------

    def _forward(self, batch: object, net: nn.Module | None = None) -> BatchOut:
        """One batch through `net` (default: the model); see batch.forward."""
        bf16 = self.config.precision == "bf16"
        return forward(net or self.model, batch, self.device, self.loss_fn, bf16=bf16, objective=self.objective)

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
            probes=self.probes,
            objective=self.objective,
        )

    def evaluate(self, loader: Iterable[Any]) -> dict[str, float]:
        """Mean loss and metrics over `loader`, in eval mode, without gradients: {"loss": ..., name: ...}.

        Under torchrun every rank evaluates all of `loader` (so every rank gets the same exact numbers). The
        probes' metrics join the means.
        """
        evaluator = self._evaluator()
        means = evaluator.means(loader)
        return {**means, **evaluator.probe().metrics} if self.probes else means

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
        run = self._start(train, valid, resume)
        for epoch in range(run.s.epoch, run.plan.epochs + 1):
            run.epoch(epoch)
        if run.arts:
            art.export_adapter(self.model, run.arts.path(art.ADAPTER))
            run.arts.plot(run.arts.rows())
        s, elapsed = run.s, run.elapsed()
        self._emit(RunEnded(s.step, elapsed, s.train_loss, s.valid_loss, s.best_valid_loss, run.where))
        elapsed = run.elapsed()
        return TrainResult(
            s.step, s.train_loss, s.valid_loss, s.best_valid_loss, elapsed, run.arts.root if run.arts else None
        )

    def _sized(self, train: Iterable[Any], valid: Iterable[Any] | None) -> tuple[Any, int, RunPlan]:
        """This rank's shard of `train`, its batches per epoch, and the run's plan; refuses what cannot run."""
        cfg = self.config
        train = self.group.shard_loader(train, cfg.seed)
        try:
            batches_per_epoch = len(train)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"train must have a length (a DataLoader over a sized dataset); got {type(train).__name__}"
            ) from None
        plan = RunPlan.of(cfg, batches_per_epoch)
        if self.group.is_main:
            plan.warn_if_warmup_too_long()
        if cfg.eval_every and valid is None and self.reference is None:
            raise ValueError(
                f"TrainConfig.eval_every={cfg.eval_every} has nothing to evaluate: pass a valid loader "
                "(fit(train, valid)) or a Trainer(reference=ReferenceKL(...))"
            )
        return train, batches_per_epoch, plan

    def _start(self, train: Iterable[Any], valid: Iterable[Any] | None, resume: bool) -> Run:
        """Set the run up (model on its device, optimizer, a resumed run's state or fresh seeds), say RunStarted."""
        cfg, model, world = self.config, self.model, self.group
        train, batches_per_epoch, plan = self._sized(train, valid)
        model.to(self.device).train()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("the model has no trainable parameters (apply_lora first, or unfreeze some)")
        compiled = self._compile(model) if cfg.compile else None  # before DDP wraps the blocks
        net = world.wrap(model, self.device, cfg.fsdp, self.fingerprints)  # what runs the batches
        optimizer = adamw(param_groups(params, cfg.loraplus_ratio), cfg.lr, cfg.betas, cfg.weight_decay)
        epoch_meter, interval = Meter(self.metrics), Meter(self.metrics)
        run = Run(
            cfg=cfg,
            world=world,
            arts=self.artifacts,
            saving=self.artifact_root is not None,
            emit=self._emit,
            forward=self._forward,
            model=model,
            net=net,
            train=train,
            valid=valid,
            plan=plan,
            batches_per_epoch=batches_per_epoch,
            params=params,
            optimizer=optimizer,
            evaluator=self._evaluator(),
            epoch_meter=epoch_meter,
            interval=interval,
            s=RunState(),
            generator=getattr(train, "generator", None),  # a DataLoader's own shuffle generator, if given
            ckpt=None,
            where=str(self.artifacts.root) if self.artifacts else None,
            device=self.device,
            compiled=compiled,
        )
        if resume:
            run.ckpt, run.s = self._resume(optimizer, epoch_meter, interval)
            if not run.s.batch:  # checkpoint at an epoch boundary: the live RNG state is all we need
                rng.restore_snapshot(*run.saved_rng("current"), run.generator)
        else:
            rng.seed_everything(cfg.seed + world.rank)  # ranks draw different dropout masks
            if self.artifacts:
                self.artifacts.clear_rows()
        self._announce(run)
        run.start_clock()
        return run

    def _compile(self, model: nn.Module) -> Compiled:
        """Compile the model's repeated blocks once (compile.py); a second `fit` reuses them."""
        if self.compiled is None:
            reason = compile_unsupported(model, self.device)
            if reason is not None:
                raise ValueError(f"TrainConfig.compile=True cannot be used: {reason}")
            self.compiled = compile_blocks(model)
        return self.compiled

    def _announce(self, run: Run) -> None:
        """Write the run's config.json (rank 0, with an artifact dir) and emit RunStarted."""
        cfg, plan, arts, s = self.config, run.plan, self.artifacts, run.s
        trainable, total = trainable_parameters(self.model)
        if arts:
            facts = {"device": str(self.device), "world_size": self.group.world_size, "trainable_params": trainable}
            facts |= {"total_params": total, "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps}
            arts.write_json(art.CONFIG, {"train": cfg.to_dict(), **facts, "metrics": [m.name for m in self.metrics]})
        self._emit(
            RunStarted(
                plan.epochs,
                plan.steps_per_epoch,
                plan.total_steps,
                s.epoch,
                s.step,
                trainable,
                total,
                str(self.device),
                cfg.precision,
                run.where,
            )
        )

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
