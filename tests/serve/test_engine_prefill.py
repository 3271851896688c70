"""Chunked prefill: a long prompt that arrives while short requests decode is prefilled a chunk per engine turn,
between their decode steps, so they keep getting tokens while it prefills; every output is what it is alone."""

from __future__ import annotations

import math
import sys
import threading
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.serve import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from _engine import started, stop_all  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    stop_all()


def alone(model, prompt: list[int], adapter: str | None, n: int) -> list[int]:
    """n greedy tokens of `prompt` run by itself through transformers' own cache (no stop token)."""
    from transformers import DynamicCache

    ctx = lk.disable_adapters(model) if adapter is None else lk.use_adapter(model, adapter)
    cache, ids, out = DynamicCache(), torch.tensor([prompt]), []
    with torch.no_grad(), ctx:
        for _ in range(n):
            out.append(int(model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


def test_a_long_prompt_is_prefilled_between_the_running_rows_decode_steps(llama):
    model, tok = llama
    g = torch.Generator().manual_seed(0)
    short = [torch.randint(4, len(tok), (n,), generator=g).tolist() for n in (3, 5)]
    long = torch.randint(4, len(tok), (100,), generator=g).tolist()
    expected = [alone(model, short[0], None, 30), alone(model, short[1], "a1", 30), alone(model, long, "a4", 5)]
    forwards: list[tuple[int, int]] = []  # (rows, positions) of every forward the engine runs
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: forwards.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    stepped, submitted, blocked = threading.Event(), threading.Event(), []

    def on_step(batch: int, queued: int) -> None:  # after its first step the engine waits until the long one is in
        if not blocked:
            stepped.set()
            blocked.append(submitted.wait(60))

    try:
        engine = started(model, tok, max_batch=4, prefill_chunk=8, on_step=on_step)
        handles = [engine.submit(p, a, SamplingParams(max_tokens=30)) for p, a in zip(short, [None, "a1"], strict=True)]
        assert stepped.wait(60)  # the short ones are prefilled and decode: the long one arrives now
        start = len(forwards)
        handles.append(engine.submit(long, "a4", SamplingParams(max_tokens=5)))
        submitted.set()
        results = [[s.token_id for s in h if s.token_id is not None] for h in handles]
    finally:
        hook.remove()
    assert blocked == [True]
    after = forwards[start:]
    chunks = [i for i, f in enumerate(after) if f[0] == 1 and f[1] > 1]  # the long prompt's prefill forwards
    assert len(chunks) == math.ceil(100 / 8) and all(after[i][1] <= 8 for i in chunks)
    between = after[chunks[0] : chunks[-1]]
    assert between.count((2, 1)) == len(chunks) - 1  # a decode step of both short rows after every chunk but the last
    assert results == expected
