"""lorakit's own checks on tensors read from a file, before any is copied into a model."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import LoraFileError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensors(
    where: str, tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], allow_nonfinite: bool
) -> None:
    """Every expected key present, nothing unexpected, shapes equal, floating dtypes, finite values."""
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {few(unexpected)}")
        raise LoraFileError(f"{where}: adapter does not fit the model; " + "; ".join(parts))
    for key, shape in shapes.items():
        t = tensors[key]
        if t.dtype not in FLOAT_DTYPES:
            raise LoraFileError(f"{where}: {key} has dtype {t.dtype}; expected a floating dtype")
        if tuple(t.shape) != tuple(shape):
            raise LoraFileError(
                f"{where}: {key} has shape {tuple(t.shape)}; the model expects {tuple(shape)} "
                "(an adapter for a different base, or another rank?)"
            )
        if not allow_nonfinite and not torch.isfinite(t).all():
            raise LoraFileError(f"{where}: {key} holds NaN or Inf values (pass allow_nonfinite=True to load anyway)")


def few(keys: list[str], k: int = 6) -> str:
    """The first `k` keys, comma-separated, and how many more there are."""
    return ", ".join(keys[:k]) + (f", ... (+{len(keys) - k})" if len(keys) > k else "")


def copy_into(tensors: dict[str, Tensor], targets: dict[str, Tensor]) -> None:
    """Copy each file tensor into its destination (cast to the destination's dtype)."""
    with torch.no_grad():
        for key, dst in targets.items():
            dst.copy_(tensors[key].to(dst.dtype))
