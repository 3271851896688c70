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

from ..adapter_table import AdapterTable
from ..adapters import disable_adapters, mixed_batch, use_adapter
from ..generation.kv import Batch
from ..generation.sampling import SamplingParams
from ..model import lora_layers
from .compose import RowKey
from .detok import TextStream
from .handle import Handle, Step


@dataclass(eq=False)
class Row:
    """A request inside the engine: what it asked for and how far it got."""

    prompt: list[int]
    adapter: RowKey  # the request's `row_key`: None, one adapter's name, or a Composition (opaque to the engine)
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


def group_key(adapter: RowKey, solo: frozenset[str]) -> str | None:
    """The group a row runs in: None (the mixed forward) or the name of its solo adapter (never composed)."""
    return adapter if isinstance(adapter, str) and adapter in solo else None


@contextlib.contextmanager
def adapters(
    model: nn.Module, key: str | None, rows: Sequence[RowKey], table: AdapterTable | None = None
) -> Iterator[None]:
    """Row i runs rows[i]: a solo adapter as itself; else the bare base or one adapter as themselves, anything else
    (several adapters, compositions) as a mixed batch (over `table`'s slots where given: nothing copied at start)."""
    distinct = set(rows)
    only = rows[0] if len(distinct) == 1 else None
    if key is not None:
        ctx: contextlib.AbstractContextManager[Any] = use_adapter(model, key)
    elif distinct == {None}:
        ctx = disable_adapters(model)
    elif isinstance(only, str):
        ctx = use_adapter(model, only)
    elif table is not None:
        ctx = table.batch(rows)
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

    def signature(self) -> tuple[str | None, tuple[RowKey, ...]]:
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


class EngineAdapters:
    """The engine's adapters around its forwards: the mixed batches' slots (an `AdapterTable`, while the loop runs)
    and the context kept set across decode steps.

    A group's context stays set while its rows stay the same and it is the only group (a mixed batch only passes
    its rows' slots, but one adapter or the bare base walks every layer); with several groups each forward sets
    its own.
    """

    def __init__(self, model: nn.Module, max_loaded: int | None) -> None:
        self.model, self.max_loaded = model, max_loaded
        self.table: AdapterTable | None = None
        self._held: tuple[object, contextlib.ExitStack] | None = None

    def open(self, plain: int) -> None:
        """Slots for the model's plain LoRA adapters (`plain` of them; `max_loaded` if given), filled once."""
        self.table = AdapterTable(self.model, self.max_loaded or max(1, plain))
        self.table.sync()

    def sync(self) -> None:
        """After adapters were loaded or unloaded: the slots match the model again."""
        if self.table is not None:
            self.table.sync()

    def enter(self, key: str | None, rows: Sequence[RowKey]) -> contextlib.AbstractContextManager[None]:
        """The context of one forward (a prefill), after releasing what was held."""
        self.release()
        return adapters(self.model, key, rows, self.table)

    def hold(self, group: Group) -> None:
        """Set the group's adapters, unless they are set already."""
        signature = group.signature()
        if self._held is not None and self._held[0] == signature:
            return
        self.release()
        stack = contextlib.ExitStack()
        stack.enter_context(adapters(self.model, group.key, signature[1], self.table))
        self._held = (signature, stack)

    def release(self) -> None:
        """Undo `hold` (before a prefill, a `call`, or leaving): the model's adapters are as they were outside."""
        if self._held is not None:
            held, self._held = self._held, None
            held[1].close()

    def close(self) -> None:
        """Release, and the layers drop the slots: the model is as it was before the loop."""
        self.release()
        if self.table is not None:
            table, self.table = self.table, None
            table.close()
