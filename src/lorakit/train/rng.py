"""Random-number state of torch (CPU and CUDA), `random`, numpy and a DataLoader's generator: seeded, captured
and restored exactly."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor


def seed_everything(seed: int) -> None:
    """Seed torch (every device), `random` and numpy's global generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, JSON) holding every global generator's state, for a checkpoint."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    state = np.random.get_state(legacy=True)
    assert isinstance(state, tuple)  # legacy=True: the MT19937 tuple (numpy's stubs also allow a dict)
    name, keys, pos, has_gauss, cached = state
    data = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    return tensors, data


def restore(tensors: dict[str, Tensor], data: dict[str, Any]) -> None:
    """Put back what `capture` returned."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = data["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = data["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


@contextlib.contextmanager
def kept() -> Iterator[None]:
    """Run the block without moving the global generators: their states are put back after it.

    Examples:
        >>> _ = torch.manual_seed(0); want = torch.rand(1)
        >>> _ = torch.manual_seed(0)
        >>> with kept():
        ...     _ = torch.rand(3)
        >>> torch.equal(torch.rand(1), want)  # the block's draws left the stream where it was
        True
    """
    tensors, data = capture()
    try:
        yield
    finally:
        restore(tensors, data)


def rank_key(name: str, rank: int) -> str:
    """Checkpoint name of a rank's RNG state: "current" for rank 0 (and one process), "current_rank1", ..."""
    return name if rank == 0 else f"{name}_rank{rank}"


def snapshot(generator: torch.Generator | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """`capture`, plus a DataLoader's own shuffle generator (tensor "loader") where it has one."""
    tensors, data = capture()
    if isinstance(generator, torch.Generator):
        tensors["loader"] = generator.get_state()
    return tensors, data


def restore_snapshot(tensors: dict[str, Tensor], data: dict[str, Any], generator: torch.Generator | None) -> None:
    """Put back what `snapshot` returned."""
    restore(tensors, data)
    if isinstance(generator, torch.Generator) and "loader" in tensors:
        generator.set_state(tensors["loader"])
