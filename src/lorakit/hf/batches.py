"""Encoded rows -> padded batches: what the trainer's DataLoader gives the model (packed rows: `packing`)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from .prepared import IGNORE_INDEX, Encoded


def padded_length(longest: int, pad_multiple: int = 1) -> int:
    """`longest` rounded up to a multiple of `pad_multiple` (compiled blocks see few distinct lengths)."""
    return -(-longest // pad_multiple) * pad_multiple


def collate(batch: Sequence[Encoded], pad_id: int, pad_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids and attention_mask (B, T); labels (B, T) with -100 padding, or (B,).

    T is the longest row rounded up to a multiple of `pad_multiple`; padding has attention mask 0 and label
    -100, so the loss is the unpadded batch's.
    """
    T = padded_length(max(len(b["input_ids"]) for b in batch), pad_multiple)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T)
    for i, b in enumerate(batch):
        ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
        mask[i, : len(b["input_ids"])] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if isinstance(batch[0]["labels"], int):
        out["labels"] = torch.tensor([b["labels"] for b in batch])  # (B,)
    else:
        labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for i, b in enumerate(batch):
            labels[i, : len(b["labels"])] = torch.tensor(b["labels"])
        out["labels"] = labels
    return out


def batches(
    data: Sequence[Encoded], batch_size: int, pad_id: int, *, shuffle: bool = False, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches in order, or shuffled with a seed."""
    order = list(range(len(data)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        yield collate([data[j] for j in order[i : i + batch_size]], pad_id)
