"""Encoded preference and prompt rows -> batches: what the DPO and GRPO objectives read (`train.dpo`, `train.grpo`).

    pairs (dpo):     rows {"prompt_ids", "chosen_ids", "rejected_ids"}  -> TRL's concatenated layout: (2B, T),
                     rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected, right-padded
    prompts (grpo):  rows {"prompt_ids", "prompt", "answer"}           -> (B, P) left-padded prompts, so that
                     every completion starts at the same column

The rows are already cut to max_length by the encode stage (`preference_encoding`), as TRL's collator cuts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .prepared import Encoded

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")  # the frozen reference's sums, when the job cached them


def collate_pairs(rows: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    """TRL's DataCollatorForPreference layout: chosen rows first, then rejected, right-padded with `pad_id`.

    Returns "input_ids", "attention_mask" and "completion_mask" (1 on completion tokens, 0 on the prompt and
    padding), each Long (2B, T); with "ref_chosen_logps"/"ref_rejected_logps" in the rows, those as float32 (B,).

    Examples:
        >>> b = collate_pairs([{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
        ...                    {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}], pad_id=0)
        >>> b["input_ids"].tolist()
        [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
        >>> b["completion_mask"].tolist()
        [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]
    """
    seqs = [(r["prompt_ids"], r[side]) for side in ("chosen_ids", "rejected_ids") for r in rows]
    T = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (2B, T)
    attention = torch.zeros((len(seqs), T), dtype=torch.long)  # (2B, T)
    completion = torch.zeros((len(seqs), T), dtype=torch.long)  # (2B, T)
    for i, (prompt, answer) in enumerate(seqs):
        n, m = len(prompt), len(prompt) + len(answer)
        ids[i, :m] = torch.tensor([*prompt, *answer], dtype=torch.long)
        attention[i, :m] = 1
        completion[i, n:m] = 1
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    for key in REF_KEYS:
        if key in rows[0]:
            out[key] = torch.tensor([float(r[key]) for r in rows], dtype=torch.float32)  # (B,)
    return out


def collate_prompts(rows: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    """Prompts left-padded with `pad_id` (TRL pads prompts on the left, so that generation appends on the right).

    Returns "prompt_ids" and "prompt_mask", Long (B, P), and the rows' "prompt" texts and "answer"s (str or None)
    as lists, which `to_device` passes through untouched.

    Examples:
        >>> b = collate_prompts([{"prompt_ids": [1, 2, 3], "prompt": "a b c", "answer": "4"},
        ...                      {"prompt_ids": [5], "prompt": "d", "answer": None}], pad_id=0)
        >>> b["prompt_ids"].tolist(), b["prompt_mask"].tolist(), b["answer"]
        ([[1, 2, 3], [0, 0, 5]], [[1, 1, 1], [0, 0, 1]], ['4', None])
    """
    P = max(len(r["prompt_ids"]) for r in rows)
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(rows), P), dtype=torch.long)  # (B, P)
    for i, r in enumerate(rows):
        n = len(r["prompt_ids"])
        ids[i, P - n :] = torch.tensor(r["prompt_ids"], dtype=torch.long)
        mask[i, P - n :] = 1
    return {
        "prompt_ids": ids,
        "prompt_mask": mask,
        "prompt": [r["prompt"] for r in rows],
        "answer": [r.get("answer") for r in rows],
    }
