"""The hyper-parameters of the stages after supervised fine-tuning: DPOConfig (preference pairs) and GRPOConfig
(sampled completions scored by rewards). Frozen and validated; names and defaults are TRL's where TRL has them, so
that a TRL user's settings mean the same here.

Examples:
    >>> DPOConfig(beta=0.1).loss_type, GRPOConfig(num_generations=4).loss_type
    ('sigmoid', 'dapo')
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

DPO_LOSSES = ("sigmoid", "ipo", "simpo")  # simpo is reference-free (length-normalised, a target margin gamma)
GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo")  # how per-token losses aggregate, as TRL's loss_type names them
SCALE_REWARDS = ("group", "batch", "none")  # what the advantages are divided by (TRL's scale_rewards)


def _positive(name: str, value: float, *, zero: bool = False) -> None:
    """ValueError naming `name` unless `value` is a finite number > 0 (>= 0 with `zero`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name}={value!r} is invalid: expected a finite number {'>=' if zero else '>'} 0")


@dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimisation on (prompt, chosen, rejected) rows.

    Args:
        loss_type: "sigmoid" (DPO, Rafailov et al. 2023), "ipo" (Azar et al. 2023; length-normalised as TRL's) or
            "simpo" (Meng et al. 2024: reference-free, average log-probs, margin `simpo_gamma`).
        beta: the inverse temperature of the implicit reward (TRL's default 0.1).
        simpo_gamma: SimPO's target reward margin, as TRL's CPO names it (`loss_type="simpo"` only).
        reference: the frozen adapter the reference model runs ("reference" when a job loads one), or None: the
            base with every adapter disabled. SimPO has no reference.
        precompute_reference: compute the reference's log-probs of every row once, before training, and cache
            them (the reference is frozen, so they never change); False computes them in every step.
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    simpo_gamma: float = 0.5
    reference: str | None = None
    precompute_reference: bool = True

    def __post_init__(self) -> None:
        if self.loss_type not in DPO_LOSSES:
            raise ValueError(f"loss_type={self.loss_type!r} is invalid: expected one of {', '.join(DPO_LOSSES)}")
        _positive("beta", self.beta)
        _positive("simpo_gamma", self.simpo_gamma, zero=True)
        if self.loss_type == "simpo" and self.reference is not None:
            raise ValueError(
                f"reference={self.reference!r} is not used by loss_type='simpo' (reference-free): drop it, "
                "or pick loss_type 'sigmoid' or 'ipo'"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for run files and reports."""
        return asdict(self)


@dataclass(frozen=True)
class GRPOConfig:
    """Group relative policy optimisation (Shao et al. 2024) on prompt rows, rollouts sampled from the live adapter.

    Args:
        num_generations: completions sampled per prompt (G, >= 2: advantages are relative to the group).
        max_completion_length: the most new tokens a completion may have.
        temperature: how completions are sampled; the policy's log-probs divide the logits by it, as TRL's do.
        top_p: nucleus sampling (1.0: off).
        top_k: the k most likely tokens only (0: off).
        beta: the weight of the KL to the reference (TRL's default 0.0: no reference pass at all).
        epsilon: the clipping range of the policy ratio, [1 - epsilon, 1 + epsilon_high].
        epsilon_high: the upper side of the range (None: epsilon).
        loss_type: how per-token losses aggregate: "grpo" (per sequence, then mean), "bnpo" (over the batch's
            tokens), "dr_grpo" (over batch × max_completion_length), "dapo" (over the tokens, TRL's default).
        scale_rewards: divide advantages by the group's reward std ("group"), the batch's ("batch") or not ("none").
        rewards: reward specs (built-ins `exact_match`, `contains`, `regex:PATTERN`, `json_valid`, or
            `pkg.module:function`), summed with `reward_weights` (None: all 1.0).
        reference: the frozen adapter the reference runs, or None: the base with every adapter disabled.
    """

    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    rewards: tuple[str, ...] = ("exact_match",)
    reward_weights: tuple[float, ...] | None = None
    reference: str | None = None

    def __post_init__(self) -> None:
        for name, low in (("num_generations", 2), ("max_completion_length", 1), ("top_k", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} is invalid: expected an int >= {low}")
        _positive("temperature", self.temperature)
        _positive("beta", self.beta, zero=True)
        _positive("epsilon", self.epsilon)
        if self.epsilon_high is not None:
            _positive("epsilon_high", self.epsilon_high)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} is invalid: expected 0 < top_p <= 1")
        if self.loss_type not in GRPO_LOSSES:
            raise ValueError(f"loss_type={self.loss_type!r} is invalid: expected one of {', '.join(GRPO_LOSSES)}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(
                f"scale_rewards={self.scale_rewards!r} is invalid: expected one of {', '.join(SCALE_REWARDS)}"
            )
        if not self.rewards:
            raise ValueError("rewards=() is invalid: name at least one reward (e.g. 'exact_match')")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(
                f"reward_weights={list(self.reward_weights)} has {len(self.reward_weights)} weight(s) for "
                f"{len(self.rewards)} reward(s) {list(self.rewards)}: give one weight per reward"
            )

    @property
    def weights(self) -> tuple[float, ...]:
        """One weight per reward (all 1.0 unless `reward_weights` says otherwise)."""
        return self.reward_weights if self.reward_weights is not None else (1.0,) * len(self.rewards)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for run files and reports."""
        return asdict(self)
