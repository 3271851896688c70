"""Evaluation: the mean loss and metrics over a loader, probes (anything else measured on the model, e.g. scores of
generated answers), and, inside a run, the reference KL (forgetting.py) and which adapter is the best so far
(the lowest valid loss over every evaluation, epoch ends and `eval_every`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from ..fingerprint import Fingerprints
from . import artifacts as art
from . import rng
from .batch import LossFn, Objective, forward
from .forgetting import ReferenceKL
from .metrics import Meter, Metric


@dataclass(frozen=True)
class ProbeResult:
    """What a probe measured: metrics reported beside the valid metrics, and samples (JSON objects) to show."""

    metrics: dict[str, float]
    samples: tuple[dict[str, Any], ...] = ()


class Probe(Protocol):
    """Something measured on the model at every evaluation besides the loss over a loader (hf/answers.py scores
    generated answers so). It must leave the model's mode and parameters as it found them."""

    def measure(self, model: nn.Module, device: torch.device) -> ProbeResult:
        """Measure `model` (on `device`)."""
        ...


class Evaluation(NamedTuple):
    """One evaluation inside a run."""

    valid_loss: float | None  # None without a valid loader
    metrics: dict[str, float]  # the valid metrics, the probes' included
    kl_ref: float | None  # None without a reference monitor
    is_best: bool  # the lowest valid loss so far: best_adapter/ now holds this adapter
    best_valid_loss: float | None
    samples: tuple[dict[str, Any], ...] = ()  # the probes' samples


class Evaluator:
    """Evaluates `model` on `device` as the trainer runs it (its loss_fn, metrics and precision).

    Args:
        reference: the forgetting monitor measured at each in-run evaluation (None: none).
        best_adapter: where an in-run evaluation with the lowest valid loss yet saves the adapter (None: nowhere).
        probes: measured at every evaluation (`Probe`); their metrics join the valid metrics.
        objective: scores each batch instead of `loss_fn` (batch.Objective: preference and RL tasks).

    Examples:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> x = torch.ones(8, 2); data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
        >>> ev = Evaluator(nn.Linear(2, 1), torch.device("cpu"), nn.functional.mse_loss, [], bf16=False)
        >>> sorted(ev.means(data)), ev.during_run(data, best_valid_loss=-1.0).is_best
        (['loss'], False)
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        loss_fn: LossFn | None,
        metrics: list[Metric],
        *,
        bf16: bool,
        reference: ReferenceKL | None = None,
        best_adapter: Path | None = None,
        fingerprints: Fingerprints | None = None,
        probes: Sequence[Probe] = (),
        objective: Objective | None = None,
    ) -> None:
        self.model, self.device, self.loss_fn, self.metrics = model, device, loss_fn, metrics
        self.objective = objective
        self.probes = list(probes)
        self.bf16, self.reference, self.best_adapter = bf16, reference, best_adapter
        self.fingerprints = fingerprints or Fingerprints()  # the base hashed once for every best-adapter save

    def means(self, loader: Iterable[Any]) -> dict[str, float]:
        """Mean loss and metrics over `loader`, in eval mode, without gradients: {"loss": ..., name: ...}."""
        meter = Meter(self.metrics)
        was_training = self.model.training
        self.model.to(self.device).eval()
        try:
            with torch.no_grad():
                for batch in loader:
                    out = forward(
                        self.model, batch, self.device, self.loss_fn, bf16=self.bf16, objective=self.objective
                    )
                    meter.update(float(out.loss), out.samples, out.outputs, out.targets)
        finally:
            self.model.train(was_training)
        return meter.means()

    def probe(self) -> ProbeResult:
        """Every probe's metrics and samples, measured in turn (random streams left as they were)."""
        metrics: dict[str, float] = {}
        samples: tuple[dict[str, Any], ...] = ()
        with rng.kept():
            for p in self.probes:
                result = p.measure(self.model, self.device)
                metrics.update(result.metrics)
                samples += result.samples
        return ProbeResult(metrics, samples)

    def during_run(self, valid: Iterable[Any] | None, best_valid_loss: float | None) -> Evaluation:
        """Validate and measure the reference KL, leaving the random streams as they were (so evaluating more
        often never changes the training); save the adapter when its valid loss beats `best_valid_loss`."""
        with rng.kept():
            means = self.means(valid) if valid is not None else {}
            kl = self.reference.measure(self.model, self.device, bf16=self.bf16) if self.reference else None
        probed = self.probe()
        loss = means.pop("loss", None)
        means.update(probed.metrics)
        is_best = loss is not None and (best_valid_loss is None or loss < best_valid_loss)
        if is_best:
            best_valid_loss = loss
            if self.best_adapter is not None:
                art.export_adapter(self.model, self.best_adapter, self.fingerprints)
        return Evaluation(loss, means, kl, is_best, best_valid_loss, probed.samples)
