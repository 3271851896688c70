"""Copying and sizing stored (maybe quantised) tensors: a torchao NF4Tensor is a wrapper of inner tensors."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def exact_clone(t: Tensor) -> Tensor:
    """A copy of a (maybe quantised) tensor with the very same stored values: a wrapper subclass such as
    NF4Tensor is rebuilt from copies of its inner tensors, with its own block sizes."""
    if not is_traceable_wrapper_subclass(t):
        return t.clone()
    names, ctx = t.__tensor_flatten__()
    return type(t).__tensor_unflatten__({n: exact_clone(getattr(t, n)) for n in names}, ctx, t.size(), t.stride())


def tensor_bytes(t: Tensor) -> int:
    """Storage bytes of a tensor, adding up the inner tensors of a subclass such as NF4Tensor."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        return sum(tensor_bytes(getattr(t, name)) for name in flatten()[0])
    return t.numel() * t.element_size()
