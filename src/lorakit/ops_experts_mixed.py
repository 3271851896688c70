"""Mixed-adapter batches over expert LoRA: each routed (token, expert) pair with its row's adapter's factors.

    y_i += B[s, e] (A[s, e] x_i)      A: (n, E, r, d_in)   B: (n, E, d_out, r)   s: row i's slot, e: its expert

The stacks are an `AdapterTable`'s (`lorakit.slot_stacks`): every loaded adapter's per-expert factors in a slot,
scaling folded into B, zero-padded to the largest rank, slot 0 all zeros (rows on the bare base). A batch only
says which slot each token's row uses; `ops_experts.experts_forward` sorts the tokens by expert as for one adapter
and adds this term on the routed rows: per row one gathered rank-r pair, never an (E, d_in, d_out) delta. An
inference feature, as mixed batches are: no dropout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MixedExpertFactors", "mixed_expert_delta", "mixed_expert_term", "token_slots"]


@dataclass(frozen=True)
class MixedExpertFactors:
    """One expert weight's slots for a mixed batch: A (n, E, r, d_in), B (n, E, d_out, r) pre-scaled, and the
    slot of every token (T,) of the experts module's input; with per-row compositions (`lorakit.composition`)
    the slots (T, K) and weights (T, K) of every token's K adapters (padding: slot 0 at weight 0)."""

    A: Tensor
    B: Tensor
    slots: Tensor
    weights: Tensor | None = None


def token_slots(slots: Tensor, tokens: int) -> Tensor:
    """Each token's slot (tokens,) from each batch row's (rows,): the experts see the rows' tokens flattened, row
    after row (a MoE block reshapes (rows, T, H) to (rows·T, H)).

    Examples:
        >>> token_slots(torch.tensor([2, 0]), 6).tolist()
        [2, 2, 2, 0, 0, 0]
    """
    rows = slots.shape[0]
    if tokens % rows:
        raise ValueError(
            f"the experts got {tokens} tokens for a mixed batch of {rows} rows: not the same number per row"
        )
    return slots.repeat_interleave(tokens // rows, dim=0)  # (rows, K) compositions' slots and weights too


def mixed_expert_term(x: Tensor, experts: Tensor, order: Tensor, f: MixedExpertFactors) -> Tensor:
    """(S, d_out): every routed row's LoRA term in a mixed batch. x (S, d_in) and experts (S,) are the routed rows,
    `order` (S,) the token each came from. A row of a composition sums its K adapters' terms, each weighted: the
    same products as `combine_adapters(method="cat")`'s concatenated pair, one gathered pass per k (K is small)."""
    if f.weights is None:
        return mixed_expert_delta(x, experts, f.slots[order], f)
    slots, weights = f.slots[order], f.weights[order].to(x.dtype)  # (S, K)
    y = weights[:, :1] * mixed_expert_delta(x, experts, slots[:, 0], f)
    for k in range(1, slots.shape[1]):
        y = y + weights[:, k : k + 1] * mixed_expert_delta(x, experts, slots[:, k], f)
    return y


def mixed_expert_delta(x: Tensor, experts: Tensor, slots: Tensor, f: MixedExpertFactors) -> Tensor:
    """(S, d_out): row i of x (S, d_in) through its slot's factors for its expert, B[s, e] (A[s, e] x_i).

    Rows are grouped by their (slot, expert) pair: each pair's rows go through its rank-r pair as two GEMMs, and rows
    on slot 0 (the bare base) are skipped. Where the groups are small (a decode step: about one row each) gathering
    every row's pair and one batched product costs less than a GEMM per group, so those batches take that form; both
    compute the same products, row by row.

    Examples:
        >>> A, B = torch.ones(2, 3, 1, 4), torch.ones(2, 3, 5, 1)
        >>> A[0], B[0] = 0, 0  # slot 0: the bare base
        >>> f = MixedExpertFactors(A, B, torch.tensor([0, 1]))
        >>> mixed_expert_delta(torch.ones(2, 4), torch.tensor([2, 0]), f.slots, f)[:, 0].tolist()
        [0.0, 4.0]
    """
    n, E = f.A.shape[:2]
    A = f.A.reshape(n * E, *f.A.shape[2:])  # (n·E, r, d_in): pair p = slot·E + expert
    B = f.B.reshape(n * E, *f.B.shape[2:])  # (n·E, d_out, r)
    pair = slots * E + experts  # (S,)
    order = torch.argsort(pair, stable=True)
    keys, counts = torch.unique_consecutive(pair[order], return_counts=True)
    if keys.numel() * _ROWS_PER_GEMM > pair.numel():  # small groups: one gathered, batched product
        h = torch.bmm(A[pair], x.unsqueeze(-1).to(A.dtype))  # (S, r, 1)
        return torch.bmm(B[pair], h).squeeze(-1).to(x.dtype)  # (S, d_out)
    y = x.new_zeros(x.shape[0], B.shape[1])
    start = 0
    for key, count in zip(keys.tolist(), counts.tolist(), strict=True):
        rows = order[start : start + count]
        start += count
        if key < E:  # slot 0: the bare base adds nothing
            continue
        xs = x[rows].to(A.dtype)
        y[rows] = ((xs @ A[key].t()) @ B[key].t()).to(x.dtype)
    return y


# below this many rows per (slot, expert) group on average, a GEMM per group costs more than gathering per row
_ROWS_PER_GEMM = 4
