"""GRPO (Shao et al. 2024, "DeepSeekMath"): sample G completions per prompt from the policy, score them, and push
each completion's tokens by its reward relative to its group, through PPO's clipped ratio, optionally held near a
reference by a KL penalty. The math is TRL 1.16's `GRPOTrainer` (single process, one pass per generation), so a
TRL user's numbers and metric names mean the same here.

    A_i      = (r_i - mean(r_group)) / (std(r_group) + 1e-4)                      (scale_rewards="group")
    ratio_it = exp(logp_it - logp_old_it)
    l_it     = -min(ratio_it * A_i, clip(ratio_it, 1 - eps, 1 + eps_high) * A_i) + beta * KL_it
    KL_it    = ratio_it * (exp(ref_it - logp_it) - (ref_it - logp_it) - 1)        (k3, bias-corrected as TRL's)
    loss     = l aggregated over the completion tokens as `loss_type` says
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from ..adapters import disable_adapters, use_adapter
from .align_config import GRPO_LOSSES, SCALE_REWARDS, GRPOConfig
from .batch import BatchOut
from .logps import token_logps
from .metrics import Metric
from .rollout_batch import RolloutBatch, rollout_batch, unpadded, until_eos

STD_EPS = 1e-4  # what TRL adds to the reward std before dividing by it


class Sampler(Protocol):
    """Samples completions from the live policy (for instance `lorakit.align.EngineSampler`)."""

    def __call__(self, prompts: list[list[int]], n: int, seed: int) -> list[list[int]]:
        """`n` completions per prompt, prompt-major (prompt i's j-th at i * n + j): the new token ids only, the EOS
        included when it was sampled. The same `seed` gives the same completions."""
        ...


class Scorer(Protocol):
    """Scores completions with named reward functions (for instance `lorakit.align.RewardScorer`).

    `names` are the reward functions' names (identifiers: they become the metrics "rewards/<name>/mean"),
    `weights` how their rewards are summed.
    """

    names: tuple[str, ...]
    weights: tuple[float, ...]

    def __call__(self, batch: Any, completions: list[list[int]], n: int) -> Tensor:
        """(B*n, len(names)) float32 rewards of `completions` (prompt-major, `n` per prompt of `batch`); nan where a
        function returned None (it does not apply to that completion)."""
        ...


class GRPOLoss(NamedTuple):
    """What `grpo_loss` computes. Shapes for N = B*G completions of C tokens.

    loss: () the aggregated loss (what backward runs on).
    per_token_loss: (N, C) each token's clipped-surrogate loss plus beta * KL (padding positions included: mask them).
    kl_mean: () the KL to the reference per completion token (detached), or None when beta is 0.
    clip_low: () the share of completion tokens whose ratio is clipped below (A < 0), TRL's clip_ratio/low_mean.
    clip_high: () the share clipped above (A > 0), TRL's clip_ratio/high_mean.
    clip_region: () the share clipped on either side, TRL's clip_ratio/region_mean.
    per_token_kl: (N, C) the KL term of each token before beta (detached), or None when beta is 0.
    """

    loss: Tensor
    per_token_loss: Tensor
    kl_mean: Tensor | None
    clip_low: Tensor
    clip_high: Tensor
    clip_region: Tensor
    per_token_kl: Tensor | None = None


def _nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """The unbiased (Bessel-corrected, as torch.std) std of `x` over `dim`, NaNs left out; nan under 2 values."""
    dims = tuple(range(x.dim())) if dim is None else (dim,)
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims)
    var = torch.nansum((x - mean) ** 2, dim=dims) / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.sqrt(), torch.full_like(var, math.nan))


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str = "group") -> Tensor:
    """Each completion's reward relative to its group's mean, divided by a std as `scale_rewards` says (TRL's).

    Args:
        rewards: (B*G,) the summed reward of each completion, prompt-major; nan for a completion no reward
            function scored (left out of the means and stds, its advantage 0, as TRL does).
        num_generations: G, the completions per prompt.
        scale_rewards: "group" (divide by the group's std + 1e-4), "batch" (by the whole batch's std + 1e-4) or
            "none" (only subtract the group mean: Dr. GRPO's advice).

    Returns:
        (B*G,) float advantages.

    Examples:
        >>> group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2, "none").tolist()
        [0.5, -0.5, 0.0, 0.0]
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r} is invalid: expected one of {', '.join(SCALE_REWARDS)}")
    if rewards.dim() != 1 or num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} do not split into groups of num_generations={num_generations}: "
            "expected (B*G,)"
        )
    grouped = rewards.view(-1, num_generations)  # (B, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards == "group":
        advantages = advantages / (_nanstd(grouped, dim=1).repeat_interleave(num_generations) + STD_EPS)
    elif scale_rewards == "batch":
        advantages = advantages / (_nanstd(rewards) + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """The mean of `x` over the positions where `mask` is 1 (0 when there are none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _aggregate(per_token_loss: Tensor, mask: Tensor, loss_type: str, max_completion_length: int | None) -> Tensor:
    """TRL's loss_type aggregations of (N, C) per-token losses over the completion tokens `mask` marks."""
    if loss_type == "grpo":  # per sequence, then over sequences: short completions weigh more per token
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":  # a constant normaliser: no length bias (Liu et al. 2025, "Dr. GRPO")
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (it divides by N * max length)")
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    # "bnpo" and "dapo" (Yu et al. 2025): over all the completion tokens; they differ only across accumulated
    # micro-batches and processes, which the trainer's mean over its accumulation group stands for here
    return _masked_mean(per_token_loss, mask)


def _check_inputs(
    logps: Tensor, old: Tensor, ref: Tensor | None, advantages: Tensor, mask: Tensor, beta: float
) -> None:
    """ValueError naming the tensor whose shape does not fit `grpo_loss`'s (N, C) / (N,) layout."""
    shape = tuple(logps.shape)
    if logps.dim() != 2 or tuple(old.shape) != shape or tuple(mask.shape) != shape:
        raise ValueError(
            f"per_token_logps {shape}, old_per_token_logps {tuple(old.shape)} and completion_mask "
            f"{tuple(mask.shape)} must all be (N, C)"
        )
    if tuple(advantages.shape) != shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be (N,) = ({shape[0]},)")
    if beta != 0.0 and (ref is None or tuple(ref.shape) != shape):
        got = None if ref is None else tuple(ref.shape)
        raise ValueError(f"beta={beta} needs ref_per_token_logps of shape {shape}; got {got}")


def grpo_loss(
    per_token_logps: Tensor,
    old_per_token_logps: Tensor,
    ref_per_token_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    use_bias_correction_kl: bool = True,
) -> GRPOLoss:
    """The clipped-ratio GRPO loss of TRL 1.16's `GRPOTrainer._compute_loss` (one process, no accumulation).

    Args:
        per_token_logps: (N, C) fp32 log-probs of the completion tokens under the policy (with gradient).
        old_per_token_logps: (N, C) the log-probs of the policy that sampled them (its detached self when each
            generation is trained on once: the ratio is 1, only its gradient matters).
        ref_per_token_logps: (N, C) the reference's log-probs, or None (required when beta > 0).
        advantages: (N,) one advantage per completion (`group_advantages`).
        completion_mask: (N, C) 1 on the scored completion tokens.
        beta: the weight of the k3 KL estimate to the reference.
        epsilon: the ratio's lower clip, 1 - epsilon.
        epsilon_high: the upper clip, 1 + epsilon_high (None: epsilon).
        loss_type: "grpo", "bnpo", "dr_grpo" or "dapo" (how per-token losses aggregate, as TRL names them).
        max_completion_length: dr_grpo's normaliser (N * max_completion_length).
        use_bias_correction_kl: multiply the KL by the (differentiable) ratio, so that its gradient is the unbiased
            reverse-KL gradient (DeepSeek-V3.2); TRL 1.16's default, which changes the gradient even on-policy.

    Returns:
        GRPOLoss: loss (), per_token_loss (N, C), kl_mean, the clip fractions, per_token_kl (N, C) | None.

    Examples:
        >>> logps = torch.zeros(2, 3, requires_grad=True)
        >>> out = grpo_loss(logps, logps.detach(), None, torch.tensor([1.0, -1.0]), torch.ones(2, 3))
        >>> out.loss.item(), out.clip_region.item()
        (0.0, 0.0)
    """
    _check_inputs(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask, beta)
    if loss_type not in GRPO_LOSSES:
        raise ValueError(f"loss_type={loss_type!r} is invalid: expected one of {', '.join(GRPO_LOSSES)}")
    high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(per_token_logps.dtype)
    adv = advantages.to(per_token_logps.dtype).unsqueeze(1)  # (N, 1)
    ratio = torch.exp(per_token_logps - old_per_token_logps)  # (N, C)
    per_token_loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + high) * adv)
    kl = kl_mean = None
    if beta != 0.0:
        assert ref_per_token_logps is not None  # _check_inputs
        delta = ref_per_token_logps - per_token_logps
        kl = torch.exp(delta) - delta - 1  # (N, C), >= 0: Schulman's k3 estimator of KL(policy || reference)
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token_loss = per_token_loss + beta * kl
        kl_mean = _masked_mean(kl.detach(), mask)
    loss = _aggregate(per_token_loss, mask, loss_type, max_completion_length)
    clips = _clip_fractions(ratio.detach(), adv, mask, 1 - epsilon, 1 + high)
    return GRPOLoss(loss, per_token_loss, kl_mean, *clips, None if kl is None else kl.detach())


def _clip_fractions(ratio: Tensor, adv: Tensor, mask: Tensor, low: float, high: float) -> tuple[Tensor, Tensor, Tensor]:
    """The shares of completion tokens whose ratio the clip cuts off: below (A < 0), above (A > 0), either."""
    low_clipped = (ratio < low) & (adv < 0)
    high_clipped = (ratio > high) & (adv > 0)
    both = low_clipped | high_clipped
    return (
        _masked_mean(low_clipped.float(), mask),
        _masked_mean(high_clipped.float(), mask),
        _masked_mean(both.float(), mask),
    )


def grpo_stats(names: Sequence[str]) -> tuple[str, ...]:
    """The columns of `GRPOObjective`'s per-row statistics, TRL's metric names, for reward functions `names`
    ("kl" is 0 when beta is 0: there is no reference pass, and TRL logs none).

    Examples:
        >>> grpo_stats(["exact_match"])[:4]
        ('reward', 'reward_std', 'rewards/exact_match/mean', 'rewards/exact_match/std')
    """
    per_reward = [f"rewards/{name}/{stat}" for name in names for stat in ("mean", "std")]
    return ("reward", "reward_std", *per_reward, "kl", "completions/mean_length", "clip_ratio/region_mean")


def _column(k: int) -> Any:
    """A metric fn reading column `k` of the statistics table (a batch statistic is on every row)."""
    return lambda outputs, _targets: outputs[:, k].mean()


def grpo_metrics(names: Sequence[str]) -> list[Metric]:
    """One `Metric` per `grpo_stats(names)` column, for `Trainer(metrics=...)` beside a `GRPOObjective`.

    Examples:
        >>> [m.name for m in grpo_metrics(["contains"])][-1]
        'clip_ratio/region_mean'
    """
    return [Metric(name, fn=_column(k)) for k, name in enumerate(grpo_stats(names))]


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Every submodule's train/eval mode on entry is its mode again on exit (samplers switch to eval)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _nan_stat(x: Tensor, fn: str) -> float:
    """nanmean or nanstd of `x` as a float (nan when nothing was scored)."""
    return float(torch.nanmean(x) if fn == "mean" else _nanstd(x))


class GRPOObjective:
    """GRPO's objective for `Trainer(objective=...)`: each batch of prompts (`collate_prompts` layout: "prompt_ids",
    "prompt_mask", "prompt", "answer") is sampled, scored and trained on once.

    Args:
        model: the (unwrapped) model being trained: the reference pass runs on it with adapters switched.
        config: the GRPO hyper-parameters.
        sampler: draws the completions (from the live adapter).
        scorer: scores them; its names and weights give the reward and the per-reward metrics.
        pad_id: the padding token id.
        eos_id: the end-of-sequence id: a completion is scored up to and including its first EOS.

    The sampler's seed is drawn from torch's global generator, which the trainer checkpoints: a resumed run
    samples what the uninterrupted run sampled. The model's train/eval modes are as found after each call.
    Each batch is sampled for itself: under gradient accumulation (or DDP), "bnpo"/"dapo" average each batch's
    token mean where TRL divides by the tokens of the whole accumulation window, and scale_rewards="batch" is
    the std of one batch.
    """

    def __init__(
        self, model: nn.Module, config: GRPOConfig, sampler: Sampler, scorer: Scorer, pad_id: int, eos_id: int
    ) -> None:
        if len(scorer.weights) != len(scorer.names):
            raise ValueError(f"scorer has {len(scorer.names)} names {scorer.names} but {len(scorer.weights)} weights")
        self.model, self.config, self.sampler, self.scorer = model, config, sampler, scorer
        self.pad_id, self.eos_id = pad_id, eos_id
        self.stats = grpo_stats(scorer.names)
        # the logits of the completion positions only, when the model can skip the prompt's (transformers')
        self._trims_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def sample(self, prompts: list[list[int]]) -> list[list[int]]:
        """G completions per prompt from the sampler (seeded from the global generator), cut after the first EOS."""
        n, cap = self.config.num_generations, self.config.max_completion_length
        seed = int(torch.randint(0, 2**31 - 1, ()))
        with kept_modes(self.model):
            completions = self.sampler(prompts, n, seed)
        if len(completions) != len(prompts) * n:
            raise ValueError(
                f"the sampler returned {len(completions)} completions for {len(prompts)} prompts × {n}: expected "
                f"{len(prompts) * n}, prompt-major"
            )
        cut = [until_eos(c, self.eos_id) for c in completions]
        too_long = [len(c) for c in cut if len(c) > cap]
        if too_long:
            raise ValueError(f"the sampler returned completions of {max(too_long)} tokens: max_completion_length={cap}")
        return cut

    def rewards(self, batch: Any, completions: list[list[int]], device: torch.device) -> Tensor:
        """(B*G, len(names)) float32 rewards from the scorer, shape-checked."""
        out = self.scorer(batch, completions, self.config.num_generations)
        expected = (len(completions), len(self.scorer.names))
        if not isinstance(out, Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the scorer returned {got}: expected a Tensor of shape {expected} (rows × rewards)")
        return out.to(device=device, dtype=torch.float32)

    def logps(self, net: nn.Module, rb: RolloutBatch) -> Tensor:
        """(B*G, C) fp32 log-probs of the completion tokens under `net`, logits divided by the temperature."""
        width = rb.completion_mask.size(1)
        extra = {"logits_to_keep": width + 1} if self._trims_logits else {}
        out = net(input_ids=rb.input_ids, attention_mask=rb.attention_mask, **extra)
        logits = getattr(out, "logits", out)[:, -(width + 1) :]  # (N, C+1, V): the positions that predict completions
        return token_logps(logits, rb.input_ids[:, -(width + 1) :], temperature=self.config.temperature)

    def reference_logps(self, rb: RolloutBatch) -> Tensor:
        """The reference's (B*G, C) log-probs, without gradient: the base (adapters disabled) or config.reference."""
        ref = self.config.reference
        switch = disable_adapters(self.model) if ref is None else use_adapter(self.model, ref)
        with torch.no_grad(), switch:
            return self.logps(self.model, rb)

    def __call__(self, net: nn.Module, batch: Any) -> BatchOut:
        """Sample, score and compute the GRPO loss of one batch of prompts (one `net` forward with gradient)."""
        cfg = self.config
        prompts = unpadded(batch["prompt_ids"], batch["prompt_mask"])
        device = batch["prompt_ids"].device
        completions = self.sample(prompts)
        per_func = self.rewards(batch, completions, device)  # (N, R)
        weights = torch.tensor(self.scorer.weights, dtype=torch.float32, device=device)
        rewards = (per_func * weights).nansum(dim=1)  # (N,)
        rewards[torch.isnan(per_func).all(dim=1)] = math.nan  # scored by no function: out of the group statistics
        advantages = group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)
        rb = rollout_batch(prompts, completions, cfg.num_generations, pad_id=self.pad_id, device=device)
        policy = self.logps(net, rb)
        ref = self.reference_logps(rb) if cfg.beta != 0.0 else None
        out = grpo_loss(
            policy,
            policy.detach(),
            ref,
            advantages,
            rb.completion_mask,
            beta=cfg.beta,
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
            loss_type=cfg.loss_type,
            max_completion_length=cfg.max_completion_length,
        )
        stats = self._stats(rewards, per_func, out, rb)
        return BatchOut(out.loss, stats, stats, len(completions), int(rb.lengths.sum()), "tokens")

    def _stats(self, rewards: Tensor, per_func: Tensor, out: GRPOLoss, rb: RolloutBatch) -> Tensor:
        """(N, K) the `grpo_stats` values, each batch statistic written on every row (K = len(self.stats))."""
        values = [_nan_stat(rewards, "mean"), _nan_stat(rewards, "std")]
        for k in range(per_func.size(1)):
            values += [_nan_stat(per_func[:, k], "mean"), _nan_stat(per_func[:, k], "std")]
        kl = 0.0 if out.kl_mean is None else float(out.kl_mean)  # no reference pass when beta is 0
        values += [kl, float(rb.lengths.float().mean()), float(out.clip_region)]
        row = torch.tensor(values, dtype=torch.float32, device=rewards.device)
        return row.expand(rewards.size(0), -1).clone()
