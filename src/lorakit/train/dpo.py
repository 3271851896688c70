"""Direct preference optimisation: the losses (sigmoid DPO, IPO, SimPO), as TRL 1.16 computes them, and the
objective the Trainer runs on batches of (prompt + chosen, prompt + rejected) rows.

With LoRA the reference model costs nothing: it is the same model with the trained adapter switched off
(`disable_adapters`: the base) or swapped for a frozen one (`use_adapter`: an SFT adapter). Its log-probs never
change, so `reference_logps` computes them once per row, before training.

Batches are the concatenated layout of `collate_pairs`: `input_ids`, `attention_mask`, `completion_mask` (2B, T),
rows 0..B-1 prompt + chosen, rows B..2B-1 prompt + rejected; optionally `ref_chosen_logps`/`ref_rejected_logps`
(B,) precomputed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import disable_adapters, use_adapter
from .align_config import DPOConfig
from .batch import BatchOut
from .device import to_device
from .logps import sequence_logps
from .metrics import Metric

DPO_STATS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)  # TRL's names of the per-pair statistics, in the column order of DPOObjective's outputs


class DPOLoss(NamedTuple):
    """Per-pair DPO losses and the implicit rewards TRL logs (detached), each (B,)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    simpo_gamma: float = 0.5,
) -> DPOLoss:
    """Per-pair preference losses from summed completion log-probs, with TRL 1.16's formulas.

    With the log-ratios `c = chosen_logps - ref_chosen_logps`, `r = rejected_logps - ref_rejected_logps`:

    - "sigmoid" (DPO, Rafailov et al. 2023): `-log σ(β (c - r))`.
    - "ipo" (Azar et al. 2023, Eq. 17), length-normalised as TRL's DPOTrainer does:
      `(c / |chosen| - r / |rejected| - 1 / (2β))²`, lengths clamped to >= 1.
    - "simpo" (Meng et al. 2024; TRL's CPOTrainer with loss_type="simpo", cpo_alpha=0), reference-free: with the
      average log-probs `a_c = chosen_logps / |chosen|`, `a_r = rejected_logps / |rejected|`:
      `-log σ(β (a_c - a_r) - γ)`.

    Rewards are `β c` and `β r` (SimPO: `β a_c` and `β a_r`, as CPO logs them), detached.

    Args:
        chosen_logps: (B,) the policy's summed log-probs of the chosen completions.
        rejected_logps: (B,) the same for the rejected completions.
        ref_chosen_logps: (B,) the reference's, or None for "simpo".
        ref_rejected_logps: (B,) the reference's, or None for "simpo".
        beta: the inverse temperature β.
        loss_type: "sigmoid", "ipo" or "simpo".
        chosen_lengths: (B,) completion tokens of each chosen row ("ipo" and "simpo").
        rejected_lengths: (B,) the same for the rejected rows.
        simpo_gamma: SimPO's target margin γ.

    Returns:
        DPOLoss(losses (B,), chosen_rewards (B,), rejected_rewards (B,)); the loss to minimise is `losses.mean()`.

    Examples:
        >>> zero = torch.zeros(2)
        >>> dpo_loss(zero, zero, zero, zero, beta=0.1).losses  # policy = reference: log 2
        tensor([0.6931, 0.6931])
        >>> dpo_loss(torch.tensor([-4.0]), torch.tensor([-8.0]), None, None, beta=2.0, loss_type="simpo",
        ...          chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([4]), simpo_gamma=0.0).losses
        tensor([0.6931])
    """
    _check_shapes(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths)
    if loss_type == "simpo":
        return _simpo(
            chosen_logps, rejected_logps, beta, _lengths(chosen_lengths, rejected_lengths, loss_type), simpo_gamma
        )
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"loss_type={loss_type!r} is invalid: expected one of sigmoid, ipo, simpo")
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps (got None)")
    chosen_logratios = chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = rejected_logps - ref_rejected_logps  # (B,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    else:
        # TRL normalises by the completion lengths so that beta means the same whatever their lengths (a choice
        # its authors confirmed with IPO's: the paper's results use this form)
        chosen_n, rejected_n = _lengths(chosen_lengths, rejected_lengths, loss_type)
        delta = chosen_logratios / chosen_n - rejected_logratios / rejected_n
        losses = (delta - 1 / (2 * beta)) ** 2
    return DPOLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def _simpo(chosen: Tensor, rejected: Tensor, beta: float, lengths: tuple[Tensor, Tensor], gamma: float) -> DPOLoss:
    """SimPO as TRL's CPO computes it (label smoothing 0): the margin gamma / beta inside beta's scaling."""
    chosen_avg, rejected_avg = chosen / lengths[0], rejected / lengths[1]  # (B,) average log-probs
    logits = chosen_avg - rejected_avg - gamma / beta
    losses = -F.logsigmoid(beta * logits)
    return DPOLoss(losses, beta * chosen_avg.detach(), beta * rejected_avg.detach())


def _lengths(chosen: Tensor | None, rejected: Tensor | None, loss_type: str) -> tuple[Tensor, Tensor]:
    """The completion lengths as floats clamped to >= 1; ValueError when a length-normalised loss lacks them."""
    if chosen is None or rejected is None:
        raise ValueError(f"loss_type={loss_type!r} needs chosen_lengths and rejected_lengths (completion tokens)")
    return chosen.float().clamp(min=1.0), rejected.float().clamp(min=1.0)


def _check_shapes(*tensors: Tensor | None) -> None:
    """ValueError naming the shapes unless every given tensor is (B,) with one B."""
    shapes = [tuple(t.shape) for t in tensors if t is not None]
    if any(len(s) != 1 for s in shapes) or len(set(shapes)) > 1:
        raise ValueError(f"dpo_loss expects (B,) tensors of one batch size B; got shapes {shapes}")


# -- the objective ---------------------------------------------------------------------------------


def dpo_stats(out: DPOLoss, chosen_logps: Tensor, rejected_logps: Tensor) -> Tensor:
    """The (B, len(DPO_STATS)) float32 table of per-pair statistics, columns in DPO_STATS order (detached)."""
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    columns = (
        chosen,
        rejected,
        (chosen > rejected).float(),
        chosen - rejected,
        chosen_logps.detach(),
        rejected_logps.detach(),
    )
    return torch.stack([c.float() for c in columns], dim=1)


def _stat(column: int, outputs: Tensor, targets: Tensor | None) -> Tensor:
    """The mean of one DPO_STATS column of a batch's table."""
    return outputs[:, column].mean()


def dpo_metrics() -> list[Metric]:
    """The Trainer metrics reading DPOObjective's statistics, under TRL's names (`DPO_STATS`).

    Examples:
        >>> [m.name for m in dpo_metrics()][:2]
        ['rewards/chosen', 'rewards/rejected']
    """
    return [Metric(name, fn=partial(_stat, k)) for k, name in enumerate(DPO_STATS)]


@contextlib.contextmanager
def reference_mode(model: nn.Module, reference: str | None) -> Iterator[nn.Module]:
    """Run the frozen reference inside the block: eval mode, no gradients, and the base with every adapter
    disabled (`reference` None) or the named adapter; the model's mode and active adapter come back on exit."""
    was_training = model.training
    swap = disable_adapters(model) if reference is None else use_adapter(model, reference)
    model.eval()
    try:
        with torch.no_grad(), swap:
            yield model
    finally:
        model.train(was_training)


def _pair_sums(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """(2B,) summed completion log-probs of a concatenated batch under `model` as it is now."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sequence_logps(logits, batch["input_ids"], batch["completion_mask"])


class DPOObjective:
    """The DPO objective for `Trainer(objective=...)`: one forward of the concatenated pairs through `net`, the
    reference's log-probs from the batch (precomputed) or from `model` under `reference_mode`, and `dpo_loss`.

    Args:
        model: the unwrapped model (the reference runs on it, without gradients).
        config: the loss and the reference (`DPOConfig`).

    Returns BatchOut(loss = mean of the B pair losses, outputs = targets = the (B, 6) `DPO_STATS` table,
    samples = B pairs, units = attention tokens). Read the statistics with `dpo_metrics()`.

    Examples:
        >>> from lorakit.train import DPOConfig, Trainer, TrainConfig
        >>> objective = DPOObjective(torch.nn.Identity(), DPOConfig(beta=0.1))
        >>> objective.config.loss_type
        'sigmoid'
    """

    def __init__(self, model: nn.Module, config: DPOConfig) -> None:
        if not isinstance(config, DPOConfig):
            raise TypeError(f"config must be a lorakit.train.DPOConfig, got {type(config).__name__}")
        self.model = model
        self.config = config

    def __call__(self, net: nn.Module, batch: Mapping[str, Any]) -> BatchOut:
        """Score one concatenated batch: `net` runs it once, with gradients."""
        _check_batch(batch)
        ids, completion = batch["input_ids"], batch["completion_mask"]
        logps = _pair_sums(net, batch)  # (2B,)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = self._reference(batch)
        lengths = completion[:, 1:].sum(dim=1)  # (2B,) the completion tokens scored
        if self.config.loss_type == "ipo":
            lengths = completion.sum(dim=1)  # TRL's DPOTrainer counts them on the unshifted mask
        chosen_n, rejected_n = lengths.chunk(2)
        out = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=self.config.beta,
            loss_type=self.config.loss_type,
            chosen_lengths=chosen_n,
            rejected_lengths=rejected_n,
            simpo_gamma=self.config.simpo_gamma,
        )
        if self.config.loss_type == "simpo":  # CPO logs the average log-probs its loss uses
            chosen, rejected = chosen / chosen_n.clamp(min=1), rejected / rejected_n.clamp(min=1)
        stats = dpo_stats(out, chosen, rejected)
        pairs = len(ids) // 2
        return BatchOut(out.losses.mean(), stats, stats, pairs, int(batch["attention_mask"].sum()), "tokens")

    def _reference(self, batch: Mapping[str, Any]) -> tuple[Tensor | None, Tensor | None]:
        """The reference's (chosen, rejected) sums (B,) each: from the batch when precomputed, else computed."""
        if self.config.loss_type == "simpo":
            return None, None
        if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        with reference_mode(self.model, self.config.reference):
            chosen, rejected = _pair_sums(self.model, batch).chunk(2)
        return chosen, rejected


def _check_batch(batch: Mapping[str, Any]) -> None:
    """ValueError naming what is missing or odd unless `batch` has the concatenated-pairs layout."""
    missing = [k for k in ("input_ids", "attention_mask", "completion_mask") if k not in batch]
    if missing:
        raise ValueError(f"a DPO batch needs input_ids, attention_mask and completion_mask; missing {missing}")
    ids = batch["input_ids"]
    if ids.dim() != 2 or len(ids) % 2:
        raise ValueError(
            f"input_ids {tuple(ids.shape)}: expected (2B, T), rows 0..B-1 prompt + chosen, B..2B-1 prompt + rejected"
        )


def reference_logps(
    model: nn.Module,
    rows: Sequence[Mapping[str, Any]],
    collate: Callable[[list[Any]], Mapping[str, Any]],
    *,
    config: DPOConfig,
    batch_size: int,
    device: torch.device,
    bf16: bool = False,
) -> list[tuple[float, float]]:
    """The frozen reference's (chosen, rejected) summed completion log-probs of every row, in row order.

    Runs without gradients in eval mode (the model's mode and active adapter are restored), the reference being
    the base with adapters disabled (`config.reference` None) or that named adapter. Store them in the rows as
    "ref_chosen_logps"/"ref_rejected_logps" and `collate_pairs` passes them on to `DPOObjective`.

    Args:
        model: the model with its adapters.
        rows: encoded pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`).
        collate: rows -> a concatenated batch (`collate_pairs` with its pad id bound).
        config: which reference (`config.reference`).
        batch_size: pairs per forward.
        device: where the model runs.
        bf16: under bf16 autocast, as the training steps run (so the cached values are the ones a step would get).

    Examples:
        >>> import lorakit as lk
        >>> from lorakit.train import DPOConfig
        >>> class Tiny(nn.Module):  # a causal LM in miniature: an embedding is its logits
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb = nn.Embedding(8, 8)
        ...     def forward(self, input_ids, attention_mask, use_cache):
        ...         return type("Out", (), {"logits": self.emb(input_ids)})
        >>> m = lk.apply_lora(Tiny(), lk.LoraConfig(rank=2), ["emb"])
        >>> batch = {"input_ids": torch.tensor([[1, 2], [1, 3]]), "attention_mask": torch.ones(2, 2),
        ...          "completion_mask": torch.tensor([[0, 1], [0, 1]])}
        >>> len(reference_logps(m, [{}], lambda rows: batch, config=DPOConfig(), batch_size=1,
        ...                     device=torch.device("cpu")))
        1
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected an int >= 1")
    out: list[tuple[float, float]] = []
    with reference_mode(model, config.reference):
        for start in range(0, len(rows), batch_size):
            batch = to_device(dict(collate(list(rows[start : start + batch_size]))), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                chosen, rejected = _pair_sums(model, batch).chunk(2)  # type: ignore[arg-type]
            out += zip(chosen.tolist(), rejected.tolist(), strict=True)
    return out
