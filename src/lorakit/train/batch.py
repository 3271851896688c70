"""One batch through a model: its loss, outputs, targets and size; and how gradient accumulation weighs it.

Batches are `(inputs, targets)` pairs, scored by `loss_fn(outputs, targets)`, or mappings passed as
`model(**batch)` whose output carries `.loss` (Hugging Face style; `batch["labels"]` are the targets).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from .device import to_device

LossFn = Callable[[Tensor, Tensor], Tensor]
IGNORE_INDEX = -100  # the label cross-entropy (and transformers) skip


class BatchOut(NamedTuple):
    """What one batch gave: its fp32 loss, the outputs and targets for metrics, and how big it was."""

    loss: Tensor
    outputs: Tensor | None
    targets: Tensor | None
    samples: int  # the weight of the batch's mean loss: samples, or predicted tokens for a causal LM's own loss
    units: int  # what throughput counts: tokens (attention-mask ones) for token batches, else samples
    unit: str  # "tokens" or "samples"


class Objective(Protocol):
    """What a training task computes from a batch when it is more than `loss_fn(net(x), y)` or `net(**batch).loss`
    (preference and RL objectives: several passes, a reference, sampled completions).

    `net` is what runs the batch (the model, or its DDP/FSDP wrapper: call it once per step for the gradient
    pass so that ranks synchronise); `batch` is already on the device and inside the run's autocast. The
    returned `BatchOut.outputs`/`targets` are what the trainer's metrics score (a (batch, k) table of per-row
    statistics, for instance).
    """

    def __call__(self, net: nn.Module, batch: Any) -> BatchOut:
        """Score `batch` on `net`."""
        ...


def forward(
    net: nn.Module,
    batch: object,
    device: torch.device,
    loss_fn: LossFn | None,
    *,
    bf16: bool,
    objective: Objective | None = None,
) -> BatchOut:
    """Move `batch` to `device`, run it through `net` (under bf16 autocast if `bf16`) and score it: with
    `objective(net, batch)` when there is one, else as `loss_fn` or the model's own loss say.

    Examples:
        >>> net, batch = nn.Linear(3, 1), (torch.ones(4, 3), torch.zeros(4, 1))
        >>> out = forward(net, batch, torch.device("cpu"), nn.functional.mse_loss, bf16=False)
        >>> out.loss.dtype, out.samples, out.unit
        (torch.float32, 4, 'samples')
    """
    batch = to_device(batch, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if objective is not None:
            out = objective(net, batch)
            return out._replace(loss=out.loss.float())
        if isinstance(batch, Mapping):
            return _mapping(net, batch, loss_fn)
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"a batch must be (inputs, targets) or a mapping; got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        if loss_fn is None:
            raise ValueError("(inputs, targets) batches need Trainer(loss_fn=...), e.g. nn.functional.mse_loss")
        x, y = batch
        out = net(x)
        loss = loss_fn(out, y)
        return BatchOut(loss.float(), out, y, len(x), len(x), "samples")


def _mapping(net: nn.Module, batch: Mapping[str, Any], loss_fn: LossFn | None) -> BatchOut:
    """A mapping batch: `net(**batch)`, scored by `loss_fn(logits, labels)` or the output's own `.loss`."""
    out = net(**batch)
    targets = batch.get("labels")
    logits = getattr(out, "logits", out if isinstance(out, Tensor) else None)
    if loss_fn is not None:
        if logits is None or targets is None:
            raise ValueError(
                "Trainer(loss_fn=...) on a mapping batch needs batch['labels'] and a model output that is a "
                f"Tensor or has .logits; got labels={type(targets).__name__}, output={type(out).__name__}"
            )
        loss = loss_fn(logits, targets)
    elif getattr(out, "loss", None) is not None:
        loss = out.loss
    else:
        raise ValueError("a mapping batch needs a model output with .loss, or Trainer(loss_fn=...)")
    n = len(next(v for v in batch.values() if isinstance(v, Tensor)))
    if (
        loss_fn is None
        and isinstance(targets, Tensor)
        and targets.dim() == 2
        and logits is not None
        and logits.dim() == 3
    ):
        # a causal LM's own loss is the mean over its predicted tokens (labels shifted by one, -100 skipped):
        # weigh the batch by that count, so validation loss is per token whatever the rows' lengths
        n = int((targets[:, 1:] != IGNORE_INDEX).sum())
    tokens = real_tokens(batch)
    return BatchOut(loss.float(), logits, targets, n, tokens or n, "tokens" if tokens else "samples")


def real_tokens(batch: Mapping[str, Any]) -> int:
    """The batch's real tokens, what throughput counts: its attention mask's ones, else every input id (0: none)."""
    mask, ids = batch.get("attention_mask"), batch.get("input_ids")
    return int(mask.sum()) if mask is not None else (ids.numel() if ids is not None else 0)


def group_size(b: int, grad_accum: int, batches_per_epoch: int) -> int:
    """How many batches the accumulation group of batch `b` (1-based) holds: `grad_accum`, or fewer at the
    end of an epoch. Each batch's loss is divided by it, so every step's gradient is the mean over the
    batches actually accumulated (a last group of 1 batch weighs 1, not 1/grad_accum).

    Examples:
        >>> [group_size(b, 4, 5) for b in range(1, 6)]
        [4, 4, 4, 4, 1]
    """
    first = (b - 1) // grad_accum * grad_accum + 1  # the group's first batch
    return min(grad_accum, batches_per_epoch - first + 1)
