"""Modules trained in full with an adapter (PEFT's `modules_to_save`), as a trainable copy beside the original.

The copy never shares storage with the original: a head whose weight is tied to the input embeddings
(`tie_word_embeddings`) trains apart from them, as PEFT's ModulesToSaveWrapper does, and the user's
own tensors are never written. `lorakit.merge` puts the trained copy in the wrapper's place.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from torch import nn


class TrainedCopy(nn.Module):
    """`original` (frozen, as the user gave it) and `trained` (a deep copy that trains); runs `trained`, or
    `original` while `disabled` (set by `lorakit.adapters.disable_adapters`, as PEFT's wrapper does).

    Examples:
        >>> import torch
        >>> head = nn.Linear(4, 2)
        >>> wrapped = TrainedCopy(head)
        >>> wrapped.trained.weight is head.weight, wrapped.trained.weight.requires_grad, head.weight.requires_grad
        (False, True, False)
        >>> torch.equal(wrapped(torch.ones(1, 4)), head(torch.ones(1, 4)))
        True
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        if isinstance(original, TrainedCopy):
            raise TypeError("the module is already a TrainedCopy; wrapping it again is not allowed")
        self.original = original
        self.trained = copy.deepcopy(original)  # new storage even where `original` shares a tied weight
        self.disabled = False
        for p in original.parameters():
            p.requires_grad_(False)
        for p in self.trained.parameters():
            p.requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.original if self.disabled else self.trained)(*args, **kwargs)


def trained_copies(model: nn.Module) -> dict[str, TrainedCopy]:
    """Every TrainedCopy in the model, by dotted module name (the name of the module it stands for)."""
    return {name: m for name, m in _walk(model, "", set()) if isinstance(m, TrainedCopy)}


def _walk(module: nn.Module, prefix: str, seen: set[int]) -> Iterator[tuple[str, nn.Module]]:
    """`named_modules()` in its order, entering neither a TrainedCopy nor a LoRA layer (a module with a `stash` of
    waiting adapters, told by that attribute so this file imports no layer module): a LoRA layer holds one
    submodule per adapter, and walking them made every load slower by the number of adapters held."""
    if id(module) in seen:
        return
    seen.add(id(module))
    yield prefix, module
    if isinstance(module, TrainedCopy) or isinstance(getattr(module, "stash", None), nn.ModuleDict):
        return
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{prefix}.{name}" if prefix else name, seen)
