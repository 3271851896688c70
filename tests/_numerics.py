"""Numeric helpers shared by the tests of LoRA's modes; import after `sys.path.insert(0, tests_dir)`."""

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """The relative error |a - b| / |b| in float64 (|b| floored at 1e-30 so an exact zero reference stays finite)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
