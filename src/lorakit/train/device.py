"""Devices: resolve "auto", decide whether bf16 autocast is available, move batches, read memory."""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Mapping

import torch


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda, else mps, else cpu; a named device that is not present is an error naming it.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but torch sees no CUDA device (try 'cpu' or 'auto')")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not _mps_available():
        raise ValueError(f"device {name!r} was asked for, but MPS is not available here (try 'cpu' or 'auto')")
    return device


def _mps_available() -> bool:
    """Whether this torch has an available MPS (Apple GPU) backend."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs on this device (CPU: always; CUDA: Ampere or newer; MPS: torch >= 2.6)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "mps":
        return tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 6)
    return False


def to_device(batch: object, device: torch.device) -> object:
    """Move every tensor in a (nested) tuple, list or mapping to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """(MiB, kind): CUDA peak allocated on a GPU ("cuda"), else this process's peak RSS ("rss")."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes
    return peak_bytes / 2**20, "rss"


def check_offload(offload: bool, device: torch.device) -> None:
    """ValueError when activation offloading is asked for on a device whose activations are not on a GPU."""
    if offload and device.type != "cuda":
        raise ValueError(
            f"offload_activations=True on device {device}: there is nothing to offload, the activations saved "
            "for backward already live in CPU memory there (offloading moves them from CUDA memory to the CPU)"
        )


def saved_activations(offload: bool, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """The context a training forward runs in: `save_on_cpu` when offloading (pinned memory on CUDA, so the
    copies back during backward can overlap), else a no-op.

    Examples:
        >>> x = torch.ones(3, requires_grad=True)
        >>> with saved_activations(True, torch.device("cpu")):
        ...     y = (x * x).sum()
        >>> y.backward(); x.grad
        tensor([2., 2., 2.])
    """
    if not offload:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
