"""One LoRA layer's fixed adapter slots for mixed batches (vLLM's `lora_a_stacked`, `set_lora`, `reset_lora`).

    A: (1 + capacity, *lead, r, d_in, ...)    B: (1 + capacity, *lead, d_out, r), each adapter's scaling folded into B

zero-padded to the largest rank copied in, slot 0 always zeros (the rows that use no adapter). `lead` is what
comes before the rank in every factor: nothing for a module's LoRA, (experts,) for a 3-D expert weight's
per-expert pairs (A (E, r, d_in), B (E, d_out, r)). An adapter is
copied into its slot when an `AdapterTable` (`lorakit.adapter_table`) loads it and zeroed when it unloads it,
never when a batch starts: a batch only sets the row → slot index (`RowIndex`) that every layer of the table
shares, so starting one costs the same however many adapters the table holds.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class RowIndex:
    """The running mixed batch's row → slot index (None outside one): one object, shared by a table's layers.

    Rows that each run the base or one adapter (`lorakit.composition.row_key` a name or None) give `slots` (rows,)
    and no `weights`; a batch with a weighted composition in some row gives `slots` (rows, K) and `weights`
    (rows, K) float64, K the largest composition, shorter rows padded with slot 0 at weight 0.
    """

    def __init__(self) -> None:
        self.slots: Tensor | None = None  # (rows,) or (rows, K) int64 on the CPU; slot 0: the bare base
        self.weights: Tensor | None = None  # (rows, K) float64 on the CPU with (rows, K) slots, else None


class MixedLayer(Protocol):
    """What the stacks ask of their layer (a `lorakit.layers.LoraLayer`): how its mixed forward wants them."""

    def mixed_state(self, A: Tensor, B: Tensor, slots: Tensor, weights: Tensor | None = None) -> tuple[Tensor, ...]: ...


class SlotStacks:
    """The stacks of one layer, sized by a capacity and grown (slots or rank) only when an adapter is copied in.

    `a_shape` and `b_shape` are the layer's factor shapes at rank 1 (`LoraLayer.factor_shapes(base, 1)`); `lead`
    counts the dimensions before the rank (1 for per-expert factors).

    Examples:
        >>> stacks = SlotStacks((1, 4), (3, 1), capacity=2, index=RowIndex(), dtype=torch.float32, device="cpu")
        >>> stacks.set(2, torch.ones(2, 4), torch.ones(3, 2), scaling=0.5)
        >>> tuple(stacks.A.shape), tuple(stacks.B.shape), stacks.B[2, 0].tolist()
        ((3, 2, 4), (3, 3, 2), [0.5, 0.5])
        >>> experts = SlotStacks((5, 1, 4), (5, 3, 1), capacity=1, index=RowIndex(), dtype=torch.float32,
        ...                      device="cpu", lead=1)
        >>> experts.set(1, torch.ones(5, 2, 4), torch.ones(5, 3, 2), scaling=1.0)
        >>> tuple(experts.A.shape), tuple(experts.B.shape), experts.rank
        ((2, 5, 2, 4), (2, 5, 3, 2), 2)
    """

    def __init__(
        self,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
        *,
        capacity: int,
        index: RowIndex,
        dtype: torch.dtype,
        device: torch.device | str,
        lead: int = 0,
    ) -> None:
        self.index, self.lead = index, lead
        self.A = torch.zeros(1 + capacity, *a_shape, dtype=dtype, device=device)  # (1 + capacity, *lead, r, d_in, ..)
        b = (*b_shape[: lead + 1], b_shape[lead + 1])  # (*lead, d_out, r): a conv's trailing 1s dropped
        self.B = torch.zeros(1 + capacity, *b, dtype=dtype, device=device)  # (1 + capacity, *lead, d_out, r)
        # (the slots and weights it was made for, mixed_state)
        self._state: tuple[Tensor, Tensor | None, tuple[Tensor, ...]] | None = None

    @property
    def capacity(self) -> int:
        """How many adapters fit (slot 0, the bare base, not counted)."""
        return self.A.shape[0] - 1

    @property
    def rank(self) -> int:
        """The rank every slot is padded to: the largest copied in so far (1 before any)."""
        return self.A.shape[1 + self.lead]

    def set(self, slot: int, A: Tensor, B: Tensor, scaling: float) -> None:
        """Copy an adapter's A (*lead, r, d_in, ...) and scaling · B (*lead, d_out, r, ...) into `slot` (the stacks
        grow to fit)."""
        if not slot >= 1:
            raise ValueError(f"slot={slot} is invalid: slot 0 is the bare base, adapters take slots from 1")
        lead, rank = self.lead, A.shape[self.lead]
        self._grow(max(slot, 2 * self.capacity) if slot > self.capacity else self.capacity, max(rank, self.rank))
        with torch.no_grad():
            self.A[slot].zero_()
            self.B[slot].zero_()
            self.A[slot].narrow(lead, 0, rank).copy_(A)
            scaled = (B * scaling).reshape(*B.shape[: lead + 1], rank)  # a conv's B (d_out, r, 1, ..)
            self.B[slot].narrow(lead + 1, 0, rank).copy_(scaled)
        self._state = None

    def reset(self, slot: int) -> None:
        """Zero `slot` (the stacks grow to hold it): rows pointing at it compute the bare base."""
        if slot > self.capacity:  # new slots are zeros
            self._grow(max(slot, 2 * self.capacity), self.rank)
        elif slot >= 1:
            with torch.no_grad():
                self.A[slot].zero_()
                self.B[slot].zero_()
        self._state = None

    def state(self, layer: MixedLayer, slots: Tensor, weights: Tensor | None = None) -> tuple[Tensor, ...]:
        """What the layer's `mixed_forward` takes after x for this row → slot index (and per-row weights, cast
        to the stacks' dtype), made once per (slots, weights) pair of tensors."""
        held = self._state
        if held is not None and held[0] is slots and held[1] is weights:
            return held[2]
        if weights is None:
            state = layer.mixed_state(self.A, self.B, slots.to(self.A.device))
        else:
            w = weights.to(self.B.device, self.B.dtype)
            state = layer.mixed_state(self.A, self.B, slots.to(self.A.device), w)
        self._state = (slots, weights, state)
        return state

    def _grow(self, capacity: int, rank: int) -> None:
        """New zero stacks of this capacity and rank holding the old contents (a load beyond what was allocated)."""
        if capacity == self.capacity and rank == self.rank:
            return
        at = 1 + self.lead  # where the rank is in the stacks
        A = self.A.new_zeros(1 + capacity, *self.A.shape[1:at], rank, *self.A.shape[at + 1 :])
        B = self.B.new_zeros(1 + capacity, *self.B.shape[1:-1], rank)
        A[: self.A.shape[0]].narrow(at, 0, self.rank).copy_(self.A)
        B[: self.B.shape[0], ..., : self.rank] = self.B
        self.A, self.B = A, B
