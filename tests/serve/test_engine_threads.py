"""The engine's thread runs its GEMMs with the caller's torch thread count, not the OpenMP default of a new thread
(torch.set_num_threads only sets the calling thread's team size: a one-thread rollout ran 10x slower on a busy CPU)."""

from __future__ import annotations

import ctypes
import os
import re

import torch

from lorakit.serve import Engine


def openmp_max_threads() -> int:
    """omp_get_max_threads() of the calling thread, from the OpenMP runtime torch loaded (Linux: /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        runtime = next(
            p for line in f if re.fullmatch(r"lib[gi]?omp[\w.-]*\.so[\d.]*", (p := line.split()[-1]).rsplit("/", 1)[-1])
        )
    return int(ctypes.CDLL(runtime).omp_get_max_threads())


def test_the_engine_thread_uses_the_callers_thread_count():
    import _hf_models
    import _tiny_models

    wanted = (os.cpu_count() or 1) + 1  # never a new thread's default (the machine's cores)
    before = torch.get_num_threads()
    torch.set_num_threads(wanted)
    engine = Engine(_tiny_models.gpt2(), _hf_models.tokenizer(bos=False))
    try:
        engine.start()
        assert engine.call(openmp_max_threads) == wanted
    finally:
        engine.stop(1.0)
        torch.set_num_threads(before)
