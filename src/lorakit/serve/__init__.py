"""Serving many adapters of one causal LM: a continuous-batching engine (`lorakit serve` builds on it).

`Engine` runs one forward per decode step for every active request, whatever its adapter (the
mixed-adapter path of `lorakit.adapters.mixed_batch`), with a KV cache; requests join and leave the
running batch between steps. `SamplingParams` says how one request samples; its `Handle` streams `Step`s.
"""

from __future__ import annotations

from ..generation.sampling import SamplingParams
from .engine import Engine, EngineClosed, EngineFailed, QueueFull
from .handle import Completion, Handle, RequestStats, Step

__all__ = [
    "Completion",
    "Engine",
    "EngineClosed",
    "EngineFailed",
    "Handle",
    "QueueFull",
    "RequestStats",
    "SamplingParams",
    "Step",
]
