"""Numeric metrics beside the loss: accuracy, perplexity, or any callable; averaged over samples.

A `Metric` either scores a batch from (outputs, targets) or derives its value from the mean loss
(perplexity = exp(mean cross-entropy)). Per-batch values are weighted by batch size when averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

BatchFn = Callable[[Tensor, Tensor], "Tensor | float"]


@dataclass(frozen=True)
class Metric:
    """One named metric: `fn(outputs, targets)` per batch, or `from_loss(mean_loss)` per interval.

    Examples:
        >>> mae = Metric("mae", fn=lambda out, y: (out - y).abs().mean())
        >>> mae.fn(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])).item()
        2.0
    """

    name: str
    fn: BatchFn | None = None
    from_loss: Callable[[float], float] | None = None

    def __post_init__(self) -> None:
        # "rewards/chosen": TRL's names for preference and RL metrics are identifiers joined by "/"
        if not isinstance(self.name, str) or not all(part.isidentifier() for part in self.name.split("/")):
            raise ValueError(
                f"metric name {self.name!r} is invalid: expected an identifier such as 'accuracy' "
                "(or identifiers joined by '/', such as 'rewards/chosen')"
            )
        if (self.fn is None) == (self.from_loss is None):
            raise ValueError(f"metric {self.name!r}: give exactly one of fn= or from_loss=")


def _accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Share of argmax predictions equal to integer targets (positions with target -100 ignored)."""
    pred = outputs.argmax(dim=-1)
    keep = targets != -100
    return (pred[keep] == targets[keep]).float().mean()


def accuracy() -> Metric:
    """Classification accuracy from logits (..., classes) and integer targets (...)."""
    return Metric("accuracy", fn=_accuracy)


def perplexity() -> Metric:
    """exp(mean loss); meaningful when the loss is a mean cross-entropy in nats."""
    return Metric("perplexity", from_loss=lambda loss: math.exp(min(loss, 700.0)))


def as_metrics(metrics: Iterable[Metric] | dict[str, BatchFn] | None) -> list[Metric]:
    """Normalise `[Metric, ...]` or `{name: fn(outputs, targets)}` to a list of Metrics; names unique."""
    if metrics is None:
        return []
    items = [Metric(n, fn=f) for n, f in metrics.items()] if isinstance(metrics, dict) else list(metrics)
    for m in items:
        if not isinstance(m, Metric):
            raise TypeError(f"metrics must be lorakit.train.Metric or a {{name: callable}} dict, got {m!r}")
    names = [m.name for m in items]
    dupes = sorted({n for n in names if names.count(n) > 1} | ({"loss"} & set(names)))
    if dupes:
        raise ValueError(f"metric names must be unique and not 'loss'; repeated or reserved: {dupes}")
    return items


class Meter:
    """Running sample-weighted means of the loss and each metric; its state is plain JSON."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics
        self.reset()

    def reset(self) -> None:
        """Forget everything."""
        self.sums: dict[str, float] = {"loss": 0.0, **{m.name: 0.0 for m in self.metrics if m.fn}}
        self.count = 0

    def update(self, loss: float, n: int, outputs: Tensor | None = None, targets: Tensor | None = None) -> None:
        """Add one batch of `n` samples with mean loss `loss`."""
        self.add(self.batch_sums(loss, n, outputs, targets), n)

    def batch_sums(
        self, loss: float, n: int, outputs: Tensor | None = None, targets: Tensor | None = None
    ) -> dict[str, float]:
        """One batch's sample-weighted sums {"loss": loss * n, metric: value * n}, for `add` (here or on all ranks)."""
        sums = {"loss": loss * n}
        for m in self.metrics:
            if m.fn is not None:
                if outputs is None or targets is None:
                    raise ValueError(f"metric {m.name!r} needs outputs and targets, and this batch has none")
                with torch.no_grad():
                    sums[m.name] = float(m.fn(outputs.detach().float(), targets)) * n
        return sums

    def add(self, sums: dict[str, float], n: int) -> None:
        """Add `batch_sums` over `n` samples."""
        for k, v in sums.items():
            self.sums[k] += v
        self.count += n

    def means(self) -> dict[str, float]:
        """{"loss": ..., metric: ...}; empty when nothing was added."""
        if not self.count:
            return {}
        out = {k: v / self.count for k, v in self.sums.items()}
        for m in self.metrics:
            if m.from_loss is not None:
                out[m.name] = m.from_loss(out["loss"])
        return out

    def state(self) -> dict[str, Any]:
        """JSON-ready state, for checkpoints."""
        return {"sums": dict(self.sums), "count": self.count}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore `state()`."""
        self.sums, self.count = dict(state["sums"]), int(state["count"])
