"""Fixed adapter slots for mixed batches, as vLLM serves LoRA: adapters are copied in once, batches pick slots.

An `AdapterTable` gives every LoRA layer of a model its `SlotStacks` (`lorakit.slot_stacks`), preallocated for
`capacity` adapters, and owns the name → slot map. `load(name)` copies the adapter's factors (scaling folded in)
into its slot on every layer, `unload(name)` zeroes the slot and frees it for the next load. A mixed batch
(`batch(rows)`) then only sets one row → slot index that all the table's layers share: entering it costs the same
with 1 or 64 adapters loaded. The server keeps one table for as long as its engine runs (`lorakit.serve.engine`);
`lorakit.mixed_batch` builds one for its own rows and closes it on exit.

The table copies the factors: after an adapter's tensors change (training, a hot swap, `model.to()`), `load` it
again, or `sync()` (every loaded adapter again, new layers attached, deleted adapters unloaded).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .composition import Composition, RowSpec, row_key
from .errors import LoraAdapterNotFound, LoraStateError
from .layers import LoraLayer
from .model import lora_layers
from .slot_stacks import RowIndex, SlotStacks


def refuse_in_mixed_batch(layers: Iterable[LoraLayer], what: str) -> None:
    """A mixed batch fixes each row's adapter when it starts; changing adapters inside it would be ignored."""
    if any(layer.mixed is not None for layer in layers):
        raise LoraStateError(
            f"cannot {what} inside a mixed_batch block: each row's adapter is fixed when the "
            "block starts; leave it first, or give the rows other adapter names"
        )


def mixable(layers: Iterable[LoraLayer], names: Iterable[str]) -> None:
    """ValueError where one of `names` is a DoRA adapter (its row norm is per adapter: no shared stacks)."""
    layers = list(layers)
    dora = sorted({n for n in names for layer in layers if n in layer.adapters and layer.adapters.config(n).use_dora})
    if dora:
        raise ValueError(f"mixed batches run plain LoRA adapters only; {dora} use DoRA (use set_adapter instead)")


RowKey = str | None | Composition  # a row as `lorakit.composition.row_key` normalises it


def _parts(key: RowKey) -> Composition:
    """The (name, weight) pairs of a row key: () for the base, one pair at weight 1 for a name."""
    if key is None:
        return ()
    return ((key, 1.0),) if isinstance(key, str) else key


class AdapterTable:
    """Adapter slots on every LoRA layer of `model` for mixed batches; close it (or use it as a context) when done.

    Args:
        model: a model with LoRA layers; one table serves it at a time.
        capacity: adapters the stacks are allocated for; loading more grows them (a copy, once).

    Examples:
        >>> import lorakit as lk
        >>> m = lk.apply_lora(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(rank=2), ["0"])
        >>> with AdapterTable(m, capacity=4) as table:
        ...     table.load("default")  # its slot: slot 0 is the zeros of rows without an adapter
        ...     with table.batch(["default", None]):
        ...         m(torch.zeros(2, 4)).shape
        1
        torch.Size([2, 4])
    """

    def __init__(self, model: nn.Module, capacity: int = 8) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} is invalid: expected >= 1")
        self.model, self.capacity = model, capacity
        self.index = RowIndex()  # shared by every layer's stacks: a batch sets it once
        self.slots: dict[str, int] = {}  # adapter name -> its slot (1..capacity); 0 is the bare base
        self._layers: dict[str, LoraLayer] = {}
        self._rows: tuple[tuple[RowKey, ...], Tensor, Tensor | None] | None = None  # the last batch's keys, index
        self._attach()

    def __enter__(self) -> AdapterTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load(self, name: str) -> int:
        """Copy adapter `name` into its slot on every layer (a free one if it is new); its slot."""
        layers = self._layers.values()
        refuse_in_mixed_batch(layers, "load an adapter into the table")
        if not any(name in layer.adapters for layer in layers):
            raise LoraAdapterNotFound(f"no adapter named {name!r}; the model has {self._known()}")
        mixable(layers, [name])
        slot = self.slots.get(name) or self._free_slot()
        for layer in layers:
            stacks = self._stacks(layer)
            if name in layer.adapters:
                A, B, config = layer.adapters.factors(name)
                stacks.set(slot, A.detach(), B.detach(), config.scaling)
            else:
                stacks.reset(slot)
        self.slots[name] = slot
        self._rows = None
        return slot

    def unload(self, name: str) -> None:
        """Zero adapter `name`'s slot on every layer and free it (the model's adapter itself is untouched)."""
        if name not in self.slots:
            raise LoraAdapterNotFound(f"adapter {name!r} is not in the table; it holds {sorted(self.slots)}")
        refuse_in_mixed_batch(self._layers.values(), "unload an adapter from the table")
        slot = self.slots.pop(name)
        for layer in self._layers.values():
            self._stacks(layer).reset(slot)
        self._rows = None

    def sync(self, names: Iterable[str] | None = None) -> None:
        """Match the model: attach new LoRA layers, unload adapters it no longer has, load `names` (default: every
        plain LoRA adapter it has) again from their current tensors."""
        self._attach()
        layers = self._layers.values()
        known = {n for layer in layers for n in layer.adapters.names()}
        if names is None:
            dora = {n for layer in layers for n in layer.adapters.names() if layer.adapters.config(n).use_dora}
            names = sorted(known - dora)
        for gone in [n for n in self.slots if n not in known]:
            self.unload(gone)
        for name in names:
            self.load(name)

    def index_of(self, rows: Sequence[RowSpec]) -> tuple[Tensor, Tensor | None]:
        """The row → slot index of `rows` and the rows' weights; the same tensors for the same rows.

        Where every row is None (slot 0, the bare base) or one adapter at weight 1: slots (rows,) and no weights.
        Where a row is a weighted composition (`lorakit.composition`): slots (rows, K) and weights (rows, K) float64,
        K the largest composition, shorter rows padded with slot 0 at weight 0.
        """
        key = tuple(row_key(row) for row in rows)
        if self._rows is not None and self._rows[0] == key:
            return self._rows[1], self._rows[2]
        named = {n for k in key for n, _ in _parts(k)}
        missing = sorted(n for n in named if n not in self.slots)
        if missing:
            raise LoraAdapterNotFound(f"adapters {missing} are not in the table; it holds {sorted(self.slots)}")
        index: Tensor
        weights: Tensor | None = None
        if all(not isinstance(k, tuple) for k in key):  # today's rows: one slot each, no weights
            index = torch.tensor(
                [0 if k is None else self.slots[k] for k in key if isinstance(k, str | None)], dtype=torch.long
            )
        else:
            index, weights = self._composed(key)
        self._rows = (key, index, weights)
        return index, weights

    @contextlib.contextmanager
    def batch(self, rows: Sequence[RowSpec]) -> Iterator[nn.Module]:
        """Inside the block, row i of the model's input runs `rows[i]`: None (the bare base), an adapter name, or a
        weighted composition of adapters ({name: weight}, see `lorakit.composition`), all in one forward.

        Sets the row → slot index every layer of the table reads: no per-adapter work. Refused inside another
        mixed batch, while merged in place, inside `disable_adapters`, and after a LoRA layer was added (`sync`).
        """
        index, weights = self.index_of(rows)
        layers = lora_layers(self.model).values()
        refuse_in_mixed_batch(layers, "start another mixed batch")
        for layer in layers:
            if layer.merged:
                raise LoraStateError("mixed batches need unmerged adapters; call unmerge_(model) first")
            if layer.disabled:
                raise LoraStateError(
                    "cannot run a mixed batch inside disable_adapters(); use None rows for the bare base"
                )
            if not self._owns(layer):
                raise LoraStateError("a LoRA layer was added after the table was made; call sync() first")
        self.index.slots, self.index.weights = index, weights
        try:
            yield self.model
        finally:
            self.index.slots, self.index.weights = None, None

    def close(self) -> None:
        """Take the stacks off the layers (the model is as it was before the table); safe to call again."""
        refuse_in_mixed_batch(self._layers.values(), "close the adapter table")
        for layer in self._layers.values():
            if self._owns(layer):
                layer.slot_stacks = None
        self._layers, self.slots, self._rows = {}, {}, None

    def _attach(self) -> None:
        """Give every LoRA layer without stacks its own, sized to the table (zeros: loads fill them)."""
        layers = lora_layers(self.model)
        taken = [
            m
            for m, layer in layers.items()
            if layer.slot_stacks is not None and layer.slot_stacks.index is not self.index
        ]
        if taken:
            raise LoraStateError(f"{taken[0]!r} is already served by another AdapterTable; close that one first")
        for layer in layers.values():
            if layer.slot_stacks is None:
                like = layer.adapters.tensors(layer.adapters.names()[0])["lora_A"]  # the factors' dtype, not the base's
                a_shape, b_shape = layer.stack_shapes()
                layer.slot_stacks = SlotStacks(
                    a_shape,
                    b_shape,
                    capacity=self.capacity,
                    index=self.index,
                    dtype=like.dtype,
                    device=like.device,
                    lead=layer.stack_lead(),
                )
        self._layers = layers

    def _composed(self, key: tuple[RowKey, ...]) -> tuple[Tensor, Tensor]:
        """slots (rows, K) int64 and weights (rows, K) float64 of `key`, padded with slot 0 at weight 0."""
        parts = [_parts(k) for k in key]
        K = max(1, max(len(p) for p in parts))
        slots = torch.zeros(len(key), K, dtype=torch.long)
        weights = torch.zeros(len(key), K, dtype=torch.float64)
        for i, p in enumerate(parts):  # building the index once per distinct batch, not in the forward
            if p:
                slots[i, : len(p)] = torch.tensor([self.slots[n] for n, _ in p], dtype=torch.long)
                weights[i, : len(p)] = torch.tensor([w for _, w in p], dtype=torch.float64)
        return slots, weights

    def _owns(self, layer: LoraLayer) -> bool:
        return layer.slot_stacks is not None and layer.slot_stacks.index is self.index

    def _stacks(self, layer: LoraLayer) -> SlotStacks:
        stacks = layer.slot_stacks
        assert stacks is not None and stacks.index is self.index, "_attach gave every layer of the table its stacks"
        return stacks

    def _free_slot(self) -> int:
        """The lowest free slot; the table grows (doubling) when all are taken."""
        used = set(self.slots.values())
        slot = next(i for i in range(1, self.capacity + 2) if i not in used)
        if slot > self.capacity:
            self.capacity *= 2
        return slot

    def _known(self) -> list[str]:
        return sorted({n for layer in self._layers.values() for n in layer.adapters.names()})
