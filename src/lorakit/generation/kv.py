"""The running batch's tensors: a KV cache whose rows all end at the same column, left-padded, written in place.

Every row's sequence ends at the window's last column, so one decode step writes one column for all rows, in
place, into a slab preallocated per layer (slab.py). A row shorter than the longest is padded on the left: its
attention mask is 0 there and its keys and values are zeros (never NaN, so a masked column contributes exactly
nothing). Each row's position ids count its own tokens only, so a padded row sees the same positions it would
alone. Rows leave with `keep` (the last live row moves into each hole: the cost of the rows moved, not of the
batch); rows prefilled later join with `merge` (copied into free rows, right-aligned at the window's end). When
the slab is full the window moves back to column 0 or the slab doubles: rare, so amortised over the steps.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .slab import SlabCache

_KV = list[tuple[Tensor, Tensor]]  # per layer: keys and values (B, heads, T, head_dim)


@functools.cache
def _cache_argument(model_type: type[nn.Module]) -> str:
    """transformers 5 names the forward's cache argument `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def _forward(model: nn.Module, cache: object, **inputs: Tensor) -> Tensor:
    """The last position's logits (B, V), the cache written in place (under this transformers' argument name)."""
    argument = _cache_argument(type(model))  # type: ignore[arg-type]  # classes are hashable
    return model(**inputs, **{argument: cache}, use_cache=True).logits[:, -1]


def context_length(model: nn.Module) -> int | None:
    """The model's longest sequence (max_position_embeddings), or None when its config does not say."""
    config = getattr(model, "config", None)
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) else None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class Batch:
    """The KV cache, attention mask, next position ids (B,) and next input tokens (B,) of the running rows.

    Row i of every tensor is the same sequence; `keep` and `merge` change the rows in place (and return the new
    order / the batch) so that a step never copies the cache.
    """

    def __init__(self, cache: SlabCache, mask: Tensor, positions: Tensor, last: Tensor) -> None:
        self.cache, self.window = cache, cache.window
        self._mask = mask  # (R, C) long: 1 on a row's tokens, 0 on its left padding
        self.positions = positions  # (B,) long: each row's length, the position id of its next token
        self.last = last  # (B,) long: each row's latest token, the next step's input

    @staticmethod
    def empty(model: nn.Module, rows: int, columns: int) -> Batch:
        """A batch of `rows` rows and no column yet, its slabs sized for `columns` (allocated at the first forward)."""
        from .slab import SlabCache, Window, model_layers

        window = Window(rows, 0, 0, max(1, rows), max(1, columns))
        mask = torch.zeros((window.row_capacity, window.column_capacity), dtype=torch.long, device=_device(model))
        positions = torch.zeros(rows, dtype=torch.long, device=mask.device)
        return Batch(SlabCache(window, model_layers(model)), mask, positions, torch.zeros_like(positions))

    @property
    def mask(self) -> Tensor:
        """(B, T) long: 1 on a row's tokens, 0 on its left padding (a view of the live window)."""
        w = self.window
        return self._mask[: w.rows, w.start : w.end]

    @property
    def kv(self) -> _KV:
        """Per layer, the cached keys and values (B, heads, T, head_dim): views of the live window."""
        w = self.window
        return [(k[: w.rows, :, w.start : w.end], v[: w.rows, :, w.start : w.end]) for k, v in self.cache.slabs()]

    @property
    def size(self) -> int:
        """How many rows run."""
        return self.window.rows

    @staticmethod
    def prefill(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Batch]:
        """Run the prompts, left-padded, in one forward: the last position's logits (B, V) and their batch.

        The caller sets the adapters (a mixed batch); `last` is left for the caller to fill with the sampled tokens.
        """
        job = Prefill(model, prompts, pad_id)
        logits = job.run(model, job.remaining)
        assert logits is not None
        return logits, job.batch

    def step(self, model: nn.Module) -> Tensor:
        """One decode step: feed every row's `last` token; the logits (B, V). One column is written in place."""
        w = self.window
        if w.end == w.column_capacity:
            self._make_room()
        self._mask[: w.rows, w.end] = 1
        mask = self._mask[: w.rows, w.start : w.end + 1]  # (B, T+1)
        logits = _forward(
            model, self.cache, input_ids=self.last[:, None], attention_mask=mask, position_ids=self.positions[:, None]
        )
        w.end += 1
        self.positions = self.positions + 1
        return logits

    def write(self, model: nn.Module, ids: Tensor, mask: Tensor, position_ids: Tensor) -> Tensor:
        """Forward `ids` (B, q) after the window (with its mask and positions): the logits (B, V); q columns written."""
        w = self.window
        if w.end + ids.shape[1] > w.column_capacity:
            self._relayout(w.row_capacity, max(2 * w.column_capacity, w.width + ids.shape[1]), 0)
        self._mask[: w.rows, w.end : w.end + ids.shape[1]] = mask
        full = self._mask[: w.rows, w.start : w.end + ids.shape[1]]
        logits = _forward(model, self.cache, input_ids=ids, attention_mask=full, position_ids=position_ids)
        keep = mask[:, None, :, None].bool()  # (B, 1, q, 1): padding positions get zero keys and values
        for k, v in self.cache.slabs():
            k[: w.rows, :, w.end : w.end + ids.shape[1]].masked_fill_(~keep, 0)
            v[: w.rows, :, w.end : w.end + ids.shape[1]].masked_fill_(~keep, 0)
        w.end += ids.shape[1]
        return logits

    def keep(self, indices: Sequence[int]) -> list[int]:
        """Only these rows (increasing, distinct) go on; the new row order, as indices of the old rows.

        Each row that leaves is filled by the last live row (a copy of that one row), so the order changes.
        """
        w, n = self.window, len(indices)
        if list(indices) != sorted(set(indices)) or (n and not 0 <= indices[0] <= indices[-1] < w.rows):
            raise ValueError(f"rows to keep {list(indices)} must be increasing and in 0..{w.rows - 1}")
        kept = set(indices)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in range(n, w.rows) if i in kept]
        order = list(range(n))
        for h, m in zip(holes, movers, strict=True):
            order[h] = m
        if holes:
            dst = torch.tensor(holes, device=self._mask.device)
            src = torch.tensor(movers, device=self._mask.device)
            for k, v in self.cache.slabs():
                k[dst, :, w.start : w.end] = k[src, :, w.start : w.end]
                v[dst, :, w.start : w.end] = v[src, :, w.start : w.end]
            self._mask[dst, w.start : w.end] = self._mask[src, w.start : w.end]
        index = torch.tensor(order, dtype=torch.long, device=self._mask.device)
        self.positions, self.last = self.positions[index], self.last[index]
        w.rows = n
        used = self._mask[:n, w.start : w.end].any(0).nonzero()  # columns that are padding for every row leave
        w.start = w.start + int(used[0]) if len(used) else w.end
        return order

    def select(self, rows: Sequence[int]) -> Batch:
        """A new batch of these rows (in this order, repeats allowed): a copy of each (for one prefill run n times)."""
        from .slab import SlabCache, Window

        w = self.window
        index = torch.tensor(list(rows), dtype=torch.long, device=self._mask.device)
        cache = SlabCache(
            Window(len(rows), 0, w.width, max(1, len(rows)), max(1, w.width)), len(self.cache.slab_layers)
        )
        cache.replace(
            [
                (k[index, :, w.start : w.end].clone(), v[index, :, w.start : w.end].clone())
                for k, v in self.cache.slabs()
            ]
        )
        return Batch(cache, self._mask[index, w.start : w.end].clone(), self.positions[index], self.last[index])

    def merge(self, other: Batch) -> Batch:
        """`other`'s rows join after these (copied into free rows, right-aligned at the window's end): this batch."""
        w, o = self.window, other.window
        rows = w.rows + o.rows
        if o.width > w.end:  # the window cannot widen to the left in place: lay it out again, further right
            capacity = max(rows, 2 * w.row_capacity) if rows > w.row_capacity else w.row_capacity
            self._relayout(capacity, max(w.column_capacity, 2 * o.width), max(0, o.width - w.width))
        elif rows > w.row_capacity:
            self._relayout(max(rows, 2 * w.row_capacity), w.column_capacity, w.start)
        if o.width > w.width:  # the window widens to the left: its new columns are padding for the running rows
            new_start = w.end - o.width
            for k, v in self.cache.slabs():
                k[: w.rows, :, new_start : w.start] = 0
                v[: w.rows, :, new_start : w.start] = 0
            self._mask[: w.rows, new_start : w.start] = 0
            w.start = new_start
        first = w.end - o.width  # the joining rows' columns; before them, their padding
        for (k, v), (ok, ov) in zip(self.cache.slabs(), other.cache.slabs(), strict=True):
            k[w.rows : rows, :, w.start : first] = 0
            v[w.rows : rows, :, w.start : first] = 0
            k[w.rows : rows, :, first : w.end] = ok[: o.rows, :, o.start : o.end]
            v[w.rows : rows, :, first : w.end] = ov[: o.rows, :, o.start : o.end]
        self._mask[w.rows : rows, w.start : first] = 0
        self._mask[w.rows : rows, first : w.end] = other.mask
        self.positions = torch.cat([self.positions, other.positions])
        self.last = torch.cat([self.last, other.last])
        w.rows = rows
        return self

    def _make_room(self) -> None:
        """The window reached the slab's last column: move it back to column 0 if that frees half, else double."""
        w = self.window
        if w.start >= w.width:  # the live columns and their destination do not overlap: copy in place
            for k, v in self.cache.slabs():
                k[: w.rows, :, : w.width] = k[: w.rows, :, w.start : w.end]
                v[: w.rows, :, : w.width] = v[: w.rows, :, w.start : w.end]
            self._mask[: w.rows, : w.width] = self._mask[: w.rows, w.start : w.end]
            w.start, w.end = 0, w.width
        else:
            self._relayout(w.row_capacity, 2 * w.column_capacity, 0)

    def _relayout(self, rows: int, columns: int, start: int) -> None:
        """Copy the live rows and window into new slabs of rows x columns, the window from column `start` on."""
        from .slab import relaid

        w = self.window
        self.cache.replace(
            [(relaid(k, w, rows, columns, start), relaid(v, w, rows, columns, start)) for k, v in self.cache.slabs()]
        )
        mask = self._mask.new_zeros((rows, columns))
        mask[: w.rows, start : start + w.width] = self.mask
        self._mask = mask
        w.row_capacity, w.column_capacity, w.start, w.end = rows, columns, start, start + w.width


class Prefill:
    """Prompts run into a new batch's slab, left-padded, a chunk of columns per `run` (chunked prefill)."""

    def __init__(self, model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int) -> None:
        device = _device(model)
        T = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(prompts), T), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, T - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, T - len(p) :] = 1
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.position_ids = (self.mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): each row counts from 0 at its first token
        self.batch = Batch.empty(model, len(prompts), T)
        self.done = 0  # columns prefilled

    @property
    def remaining(self) -> int:
        """Columns not prefilled yet."""
        return self.ids.shape[1] - self.done

    def run(self, model: nn.Module, columns: int) -> Tensor | None:
        """Prefill up to `columns` more columns: the last position's logits (B, V) once the prompts are done, else None.

        The caller sets the adapters; once done, `batch` holds the prompts (`last` left for the caller to fill).
        """
        a, b = self.done, min(self.ids.shape[1], self.done + max(1, columns))
        logits = self.batch.write(model, self.ids[:, a:b], self.mask[:, a:b], self.position_ids[:, a:b])
        self.done = b
        if self.remaining:
            return None
        self.batch.positions = self.mask.sum(-1)
        return logits
