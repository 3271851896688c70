"""The engine's running rows, split into the forwards of one decode step.

Rows over the bare base and plain LoRA adapters run together in one forward (a mixed batch, `mixed_batch`).
An adapter that the mixed path cannot run (DoRA: its output is renormalised per column of the merged weight,
which the batched gathers do not compute) gets a forward of its own for its rows, in the same step, under
`use_adapter`. So a DoRA request never fails its neighbours, and each group keeps its own KV cache (`Batch`),
which rows join (`merge`) and leave (`select`) as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import disable_adapters, mixed_batch, use_adapter
from ..generation.kv import Batch
from ..generation.sampling import SamplingParams
from ..model import lora_layers
from .detok import TextStream
from .handle import Handle, Step


@dataclass(eq=False)
class Row:
    """A request inside the engine: what it asked for and how far it got."""

    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    handle: Handle
    stream: TextStream
    gen: torch.Generator
    produced: int = 0
    done: bool = field(default=False)

    def advance(self, token: int) -> Step:
        """The step of one new token: its text, and the finish reason if it ends the request."""
        self.produced += 1
        n, p = len(self.prompt), self.params
        if token in p.stop_token_ids:
            return Step(token, self.stream.rest(), "stop", n, self.produced)
        text, stopped = self.stream.push(token)
        if stopped:
            return Step(token, text, "stop", n, self.produced)
        if self.produced >= p.max_tokens:
            return Step(token, text + self.stream.rest(), "length", n, self.produced)
        return Step(token, text, None, n, self.produced)


def solo_adapters(model: nn.Module) -> frozenset[str]:
    """The adapters the mixed path cannot run (DoRA ones): each runs in a forward of its own."""
    return frozenset(
        n for layer in lora_layers(model).values() for n in layer.adapters.names() if layer.adapters.config(n).use_dora
    )


def group_key(adapter: str | None, solo: frozenset[str]) -> str | None:
    """The group a row runs in: None (the mixed forward) or the name of its solo adapter."""
    return adapter if adapter is not None and adapter in solo else None


@contextlib.contextmanager
def adapters(model: nn.Module, key: str | None, rows: Sequence[str | None]) -> Iterator[None]:
    """Row i runs adapter rows[i]: a solo adapter as itself; else the bare base or one adapter as themselves,
    several as a mixed batch."""
    distinct = set(rows)
    if key is not None:
        ctx: contextlib.AbstractContextManager[Any] = use_adapter(model, key)
    elif distinct == {None}:
        ctx = disable_adapters(model)
    elif len(distinct) == 1:
        ctx = use_adapter(model, rows[0])
    else:
        ctx = mixed_batch(model, rows)
    with ctx:
        yield


@dataclass(eq=False)
class Group:
    """Rows that run in one forward, and their KV cache (row i of `batch` is `rows[i]`)."""

    key: str | None
    batch: Batch
    rows: list[Row]

    def signature(self) -> tuple[str | None, tuple[str | None, ...]]:
        """What the adapters of this group's forward depend on (the engine keeps them set while it stays the same)."""
        return self.key, tuple(r.adapter for r in self.rows)

    def keep(self, indices: list[int]) -> bool:
        """Only these rows go on; False when none is left (the group is gone)."""
        if len(indices) == len(self.rows):
            return True
        self.rows = [self.rows[i] for i in indices]
        if indices:
            self.batch = self.batch.select(indices)
        return bool(indices)

    def join(self, batch: Batch, rows: list[Row]) -> None:
        """Newly prefilled rows join after the running ones."""
        self.batch = self.batch.merge(batch)
        self.rows.extend(rows)
