"""Values derived from tensors, kept until any of those tensors changes.

A tensor changes in place (its version counter moves), by `p.data = new` or `module.to(dtype)` (same
object, new storage), or by being replaced (a new object). The key covers all of them: the object's
identity, its storage address, offset, version, dtype, device, shape and stride. The cache holds no
reference to the tensors, not even a weak one: `module.to()` swaps tensor subclasses (NF4) in place with
`torch.utils.swap_tensors`, which refuses tensors that are referenced elsewhere. The cache lives on the
module that owns it and starts empty in copies and pickles.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

T = TypeVar("T")


def tensor_key(t: Tensor) -> tuple[object, ...] | None:
    """What identifies the tensor's current contents; None where that cannot be known (an inference tensor)."""
    if is_traceable_wrapper_subclass(t):  # e.g. torchao's NF4Tensor: its contents are its inner tensors
        inner = [tensor_key(getattr(t, name)) for name in t.__tensor_flatten__()[0]]
        return None if None in inner else (id(t), t.dtype, t.device, tuple(t.shape), *inner)
    if t.is_inference():  # no version counter: an in-place change would go unseen
        return None
    return (id(t), t.data_ptr(), t.storage_offset(), t._version, t.dtype, t.device, tuple(t.shape), t.stride())


class TensorCache(Generic[T]):
    """One value computed from `tensors` (and a hashable `extra`), recomputed whenever any of them changed.

    Examples:
        >>> cache, w = TensorCache(), torch.ones(2)
        >>> cache.get([w], lambda: w.sum().item())
        2.0
        >>> w.mul_(3)
        tensor([3., 3.])
        >>> cache.get([w], lambda: w.sum().item())
        6.0
    """

    def __init__(self) -> None:
        self._entry: tuple[list[object], T] | None = None  # (key, value), one attribute: replaced atomically

    def get(self, tensors: Sequence[Tensor], compute: Callable[[], T], extra: Hashable = None) -> T:
        """The cached value while `tensors` and `extra` are as when it was computed, else `compute()` (kept)."""
        if torch.compiler.is_compiling():  # a compiled graph holds no Python-side state
            return compute()
        key = [extra, *(tensor_key(t) for t in tensors)]
        if None in key[1:]:
            return compute()
        entry = self._entry
        if entry is not None and entry[0] == key:
            return entry[1]
        value = compute()
        self._entry = (key, value)
        return value

    def clear(self) -> None:
        """Forget the value."""
        self._entry = None

    def __getstate__(self) -> dict[str, object]:  # copies and pickles start empty: the key names the original's tensors
        return {}

    def __setstate__(self, state: dict[str, object]) -> None:
        self._entry = None
