"""Per-token log-probabilities of a sequence under a causal LM's logits: what DPO and GRPO score completions with."""

from __future__ import annotations

import torch
from torch import Tensor

_ROWS_PER_CHUNK = 8  # rows whose fp32 logits exist at once: the (N, T, V) fp32 copy is never whole


def token_logps(logits: Tensor, input_ids: Tensor, *, temperature: float = 1.0) -> Tensor:
    """log p(input_ids[:, t + 1] | input_ids[:, :t + 1]) for every position, in fp32.

    Computed as the gathered logit minus the logsumexp over the vocabulary (log_softmax without keeping its
    (N, T, V) output), `_ROWS_PER_CHUNK` rows at a time, of `logits / temperature` as TRL scores sampled tokens.

    Args:
        logits: (N, T, V) the model's logits for `input_ids`, any float dtype.
        input_ids: (N, T) the token ids the logits were computed for.
        temperature: what the logits are divided by (the sampling temperature; 1.0: none).

    Returns:
        (N, T - 1) float32: entry [i, t] scores input_ids[i, t + 1].

    Examples:
        >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
        >>> token_logps(logits, torch.tensor([[0, 1, 2]])).exp()
        tensor([[0.2500, 0.2500]])
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"token_logps expects logits (N, T, V) and input_ids (N, T); got {tuple(logits.shape)} and "
            f"{tuple(input_ids.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid: expected a number > 0")
    targets = input_ids[:, 1:].unsqueeze(-1)  # (N, T-1, 1)
    rows = []
    for start in range(0, logits.size(0), _ROWS_PER_CHUNK):
        chunk = logits[start : start + _ROWS_PER_CHUNK, :-1].float()  # (n, T-1, V)
        if temperature != 1.0:
            chunk = chunk / temperature
        picked = chunk.gather(-1, targets[start : start + _ROWS_PER_CHUNK]).squeeze(-1)  # (n, T-1)
        rows.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(rows) if rows else logits.new_zeros(0, max(logits.size(1) - 1, 0), dtype=torch.float32)
