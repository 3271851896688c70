"""A KV cache preallocated per layer and written in place: the storage under `kv.Batch`.

Each layer keeps its keys and values in one slab (rows, heads, columns, head_dim), allocated once on the model's
device and dtype. The batch's live rows are rows 0..n-1 and its live columns the window [start, end): every row
ends at `end` (left padding), so a forward of q new positions writes columns [end, end + q) of every live row in
place and attends to views of [start, end + q) — no `torch.cat` per step, as transformers' `DynamicCache` does.
The batch (kv.py) moves rows and columns between steps; `SlabCache` is the transformers `Cache` a forward writes
through (`update`, `get_seq_length`, `get_mask_sizes`: what Llama- and GPT-2-style models call).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class Window:
    """Where a batch's live entries are: rows 0..rows-1, columns [start, end); the capacity a slab is allocated at."""

    rows: int
    start: int
    end: int
    row_capacity: int
    column_capacity: int

    @property
    def width(self) -> int:
        """Live columns."""
        return self.end - self.start


class SlabLayer(CacheLayerMixin):
    """One layer's keys and values (rows, heads, columns, head_dim), allocated at the first write."""

    is_sliding = False
    is_compileable = False

    def __init__(self, window: Window) -> None:
        super().__init__()
        self.window = window

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Allocate the slabs at the window's capacity, in the first write's heads, head_dim, dtype and device."""
        w = self.window
        self.device = key_states.device
        shape = (w.row_capacity, key_states.shape[1], w.column_capacity)
        self.keys = key_states.new_zeros((*shape, key_states.shape[-1]))
        self.values = value_states.new_zeros((*shape, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        """Write the new positions (rows, heads, q, head_dim) at the window's end; views of the window and them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        w, q = self.window, key_states.shape[-2]
        self.keys[: w.rows, :, w.end : w.end + q].copy_(key_states)
        self.values[: w.rows, :, w.end : w.end + q].copy_(value_states)
        return self.keys[: w.rows, :, w.start : w.end + q], self.values[: w.rows, :, w.start : w.end + q]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The attention covers the window and the new positions."""
        return self.window.width + query_length, 0

    def get_seq_length(self) -> int:
        """The cached positions a new one follows (the window's width)."""
        return self.window.width

    def get_max_length(self) -> int:
        """No maximum: the batch grows the slab when it is full."""
        return -1

    def tensors(self) -> tuple[Tensor, Tensor]:
        """The keys and values slabs (after the first write)."""
        assert self.keys is not None and self.values is not None, "the slab is allocated at the first forward"
        return self.keys, self.values


class SlabCache(Cache):
    """The transformers `Cache` over one slab per layer, all sharing one `Window`."""

    def __init__(self, window: Window, layers: int) -> None:
        self.slab_layers = [SlabLayer(window) for _ in range(layers)]
        super().__init__(layers=list(self.slab_layers))
        self.window = window

    def slabs(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer, the keys and values slabs."""
        return [layer.tensors() for layer in self.slab_layers]

    def replace(self, slabs: list[tuple[Tensor, Tensor]]) -> None:
        """Hold these slabs instead (a grown or re-laid copy)."""
        for layer, (k, v) in zip(self.slab_layers, slabs, strict=True):
            layer.keys, layer.values, layer.device, layer.is_initialized = k, v, k.device, True


def relaid(slab: Tensor, window: Window, rows: int, columns: int, start: int) -> Tensor:
    """A new zeroed slab of `rows` x `columns` holding `slab`'s live rows and window from column `start` on."""
    out = slab.new_zeros((rows, slab.shape[1], columns, slab.shape[3]))
    out[: window.rows, :, start : start + window.width] = slab[: window.rows, :, window.start : window.end]
    return out


def model_layers(model: torch.nn.Module) -> int:
    """How many attention layers write the cache (the config's num_hidden_layers, or n_layer for GPT-2)."""
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if config is not None and hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ValueError(f"{type(model).__name__}'s config has no num_hidden_layers: expected a transformers causal LM")
    return n
