"""Per-token log-probabilities of a sequence under a causal LM's logits: what preference and RL objectives score.

Computed in float32 whatever the logits' dtype (bf16 log-softmax loses the small differences DPO's log-ratios
are made of), as `logit[target] - logsumexp(logits)`, a row at a time when a float32 copy is needed, so no
(N, T, V) float32 tensor is built beside the logits.
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_logps(logits: Tensor, input_ids: Tensor, *, temperature: float = 1.0) -> Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for every position, in float32.

    Args:
        logits: (N, T, V) the model's next-token logits (any float dtype).
        input_ids: (N, T) the tokens the logits were computed from.
        temperature: the logits are divided by it first (sampling's temperature, as TRL's GRPO does).

    Returns:
        (N, T-1) float32 (float64 for float64 logits): column t is the log-probability of token t+1. Mask it with `completion_mask[:, 1:]`.

    Examples:
        >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
        >>> token_logps(logits, torch.tensor([[0, 1, 2]]))
        tensor([[-1.3863, -1.3863]])
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} do not match: expected "
            "logits (N, T, V) and input_ids (N, T)"
        )
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid: expected a number > 0")
    targets = input_ids[:, 1:].unsqueeze(-1)  # (N, T-1, 1)
    dtype = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 logits kept as they are
    # the whole batch at once when no copy is made; else one row at a time, so that the forward's peak holds one
    # row's float32 logits beside the model's
    step = len(logits) if logits.dtype == dtype and temperature == 1.0 else 1
    rows = []
    with torch.autocast(logits.device.type, enabled=False):
        for i in range(0, len(logits), step):
            x = logits[i : i + step, :-1].to(dtype)  # (n, T-1, V)
            if temperature != 1.0:
                x = x / temperature
            picked = x.gather(-1, targets[i : i + step]).squeeze(-1)  # (n, T-1)
            rows.append(picked - torch.logsumexp(x, dim=-1))
    return torch.cat(rows) if len(rows) > 1 else rows[0]


def sequence_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor, *, temperature: float = 1.0) -> Tensor:
    """The sum of each row's completion-token log-probabilities (N,), float32: `token_logps` masked by
    `completion_mask[:, 1:]` (prompt and padding count nothing).

    Examples:
        >>> ids, mask = torch.tensor([[5, 1, 2]]), torch.tensor([[0, 1, 1]])
        >>> sequence_logps(torch.zeros(1, 3, 4), ids, mask)  # two completion tokens, each log(1/4)
        tensor([-2.7726])
    """
    if completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"completion_mask {tuple(completion_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    per_token = token_logps(logits, input_ids, temperature=temperature)  # (N, T-1)
    return per_token.masked_fill(completion_mask[:, 1:] == 0, 0.0).sum(dim=1)
