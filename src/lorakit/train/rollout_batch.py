"""Sampled completions as one batch for the policy's forward: prompts left-padded, completions right-padded,
and the masks that say which tokens are scored (TRL's GRPO layout, so the same tokens meet the same positions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class RolloutBatch(NamedTuple):
    """B prompts × G completions as tensors, prompt-major (prompt i's j-th completion is row i * G + j).

    input_ids: (B*G, P + C) left-padded prompt, then right-padded completion.
    attention_mask: (B*G, P + C) 1 on real prompt tokens and on completion tokens up to the first EOS.
    completion_mask: (B*G, C) 1 on the completion tokens that are scored (up to and including the first EOS).
    lengths: (B*G,) long, the number of scored tokens of each completion.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    lengths: Tensor


def unpadded(prompt_ids: Tensor, prompt_mask: Tensor) -> list[list[int]]:
    """The token ids of each row of a padded (B, P) prompt batch where `prompt_mask` (B, P) is 1."""
    return [row[keep.bool()].tolist() for row, keep in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)]


def until_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    """`ids` up to and including the first `eos_id` (all of them when there is none), as TRL masks a completion.

    Examples:
        >>> until_eos([5, 6, 2, 7], eos_id=2), until_eos([5, 6], eos_id=2)
        ([5, 6, 2], [5, 6])
    """
    ids = list(ids)
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


def _padded(rows: Sequence[Sequence[int]], width: int, pad_id: int, *, left: bool) -> tuple[Tensor, Tensor]:
    """(len(rows), width) ids padded with `pad_id` on the left or right, and the 0/1 mask of the real tokens."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def rollout_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    n: int,
    *,
    pad_id: int,
    device: torch.device | str = "cpu",
) -> RolloutBatch:
    """Prompt i (repeated `n` times) joined to completions i*n .. i*n+n-1, padded as TRL's GRPO pads them.

    Args:
        prompts: B prompts' token ids (no padding).
        completions: B*n completions' token ids, prompt-major, each already cut after its first EOS.
        n: completions per prompt (G).
        pad_id: the padding token id.
        device: where the tensors go.

    Examples:
        >>> rb = rollout_batch([[7, 8], [9]], [[1, 2], [3], [4], [5, 6]], 2, pad_id=0)
        >>> rb.input_ids.tolist()[1], rb.completion_mask.tolist()[1], rb.lengths.tolist()
        ([7, 8, 3, 0], [1, 0], [2, 1, 1, 2])
    """
    if len(completions) != len(prompts) * n:
        raise ValueError(
            f"{len(completions)} completions for {len(prompts)} prompts × {n} generations: expected "
            f"{len(prompts) * n}, prompt-major"
        )
    repeated = [p for p in prompts for _ in range(n)]
    prompt_ids, prompt_mask = _padded(repeated, max(len(p) for p in prompts), pad_id, left=True)
    # at least one column, so an all-empty batch still has a (masked) completion position
    width = max(1, max(len(c) for c in completions))
    completion_ids, completion_mask = _padded(completions, width, pad_id, left=False)
    return RolloutBatch(
        torch.cat([prompt_ids, completion_ids], dim=1).to(device),
        torch.cat([prompt_mask, completion_mask], dim=1).to(device),
        completion_mask.to(device),
        completion_mask.sum(dim=1).to(device),
    )
