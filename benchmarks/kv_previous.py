"""The KV cache of lorakit before the preallocated slab (generation/kv.py at the previous revision), kept only so
that benchmarks/serve.py can step it beside the new one in the same run: transformers' `DynamicCache`, grown by
`torch.cat` every step, rebuilt by `select` and `merge`.

The running batch's tensors: a KV cache whose rows all end at the same column, left-padded.

Every row's sequence ends at the last column, so one decode step appends one column for all rows. A row
shorter than the longest is padded on the left: its attention mask is 0 there and its keys and values are
zeros (never NaN, so a masked column contributes exactly nothing). Each row's position ids count its own
tokens only, so a padded row sees the same positions it would alone. Rows leave with `select`; rows
prefilled later join with `merge`, both padding or trimming columns so no column is padding for every row.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

_KV = list[tuple[Tensor, Tensor]]  # per layer: keys and values (B, heads, T, head_dim)


def _cache(kv: _KV):  # -> transformers.DynamicCache
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=kv)


def _tensors(cache) -> _KV:  # noqa: ANN001 - a transformers Cache
    return [(layer.keys, layer.values) for layer in cache.layers]


@functools.cache
def _cache_argument(model_type: type[nn.Module]) -> str:
    """transformers 5 names the forward's cache argument `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def _forward(model: nn.Module, cache: object | None, **inputs: Tensor) -> tuple[Tensor, object]:
    """The last position's logits (B, V) and the cache, under the cache argument's name in this transformers."""
    argument = _cache_argument(type(model))  # type: ignore[arg-type]  # classes are hashable
    out = model(**inputs, **{argument: cache}, use_cache=True)
    new = getattr(out, "cache", None)
    return out.logits[:, -1], new if new is not None else out.past_key_values


def context_length(model: nn.Module) -> int | None:
    """The model's longest sequence (max_position_embeddings), or None when its config does not say."""
    config = getattr(model, "config", None)
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) else None


def _pad_left(t: Tensor, n: int, dim: int) -> Tensor:
    """`t` with n zeros in front along `dim`."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass
class Batch:
    """The KV cache, attention mask (B, T), next position ids (B,) and next input tokens (B,) of the running rows."""

    cache: object  # a transformers DynamicCache, grown in place by each step
    mask: Tensor  # (B, T) long: 1 on a row's tokens, 0 on its left padding
    positions: Tensor  # (B,) long: each row's length, the position id of its next token
    last: Tensor  # (B,) long: each row's latest token, the next step's input

    @property
    def kv(self) -> _KV:
        """Per layer, the cached keys and values (B, heads, T, head_dim)."""
        return _tensors(self.cache)

    @property
    def size(self) -> int:
        """How many rows run."""
        return int(self.mask.shape[0])

    @staticmethod
    def prefill(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Batch]:
        """Run the prompts, left-padded, in one forward: the last position's logits (B, V) and their batch.

        The caller sets the adapters (a mixed batch); `last` is left for the caller to fill with the sampled tokens.
        """
        device = next(model.parameters()).device
        T = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(prompts), T), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, T - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, T - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): each row counts from 0 at its first token
        logits, cache = _forward(model, None, input_ids=ids, attention_mask=mask, position_ids=position_ids)
        keep = mask[:, None, :, None].bool()  # (B, 1, T, 1)
        kv = [(k.where(keep, 0), v.where(keep, 0)) for k, v in _tensors(cache)]  # padding: zeros
        lengths = mask.sum(-1)
        return logits, Batch(_cache(kv), mask, lengths, torch.zeros_like(lengths))

    def step(self, model: nn.Module) -> Tensor:
        """One decode step: feed every row's `last` token; the logits (B, V). The cache grows by one column."""
        ones = self.mask.new_ones((self.size, 1))
        mask = torch.cat([self.mask, ones], dim=1)  # (B, T+1)
        logits, self.cache = _forward(
            model, self.cache, input_ids=self.last[:, None], attention_mask=mask, position_ids=self.positions[:, None]
        )
        self.mask = mask
        self.positions = self.positions + 1
        return logits

    def select(self, rows: Sequence[int]) -> Batch:
        """The batch of only these rows (in this order), without the columns that are padding for all of them."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        kv = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v in self.kv]
        return Batch(
            _cache(kv), mask[:, start:], self.positions.index_select(0, index), self.last.index_select(0, index)
        )

    def merge(self, other: Batch) -> Batch:
        """These rows followed by `other`'s, the shorter side left-padded so all rows end at the same column."""
        T = max(self.mask.shape[1], other.mask.shape[1])
        a, b = T - self.mask.shape[1], T - other.mask.shape[1]
        kv = [
            (
                torch.cat([_pad_left(k1, a, 2), _pad_left(k2, b, 2)]),
                torch.cat([_pad_left(v1, a, 2), _pad_left(v2, b, 2)]),
            )
            for (k1, v1), (k2, v2) in zip(self.kv, other.kv, strict=True)
        ]
        mask = torch.cat([_pad_left(self.mask, a, 1), _pad_left(other.mask, b, 1)])
        return Batch(_cache(kv), mask, torch.cat([self.positions, other.positions]), torch.cat([self.last, other.last]))
