"""The continuous-batching engine on real tiny transformers models with real adapters.

Every greedy request must equal the same prompt run alone through `lk.use_adapter` (or
`lk.disable_adapters`) and `model.generate`, token for token, whatever else shares its batch.
Requests that race the engine synchronise on events (its `on_step` hook, a handle's first step).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

from lorakit.serve import Engine, SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from _engine import GPT2_ADAPTERS, LLAMA_ADAPTERS, alone, greedy, prompts, started, stop_all  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops run faster on one thread, and two threads of this test do not fight over cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def check(tok, prompt, ref, steps):
    """A request's steps against its reference: tokens, counts, finish reason and text."""
    tokens = [s.token_id for s in steps if s.token_id is not None]
    assert tokens == ref
    last = steps[-1]
    assert [s.finish_reason for s in steps[:-1]] == [None] * (len(steps) - 1)
    assert last.finish_reason == ("stop" if ref and ref[-1] == tok.eos_token_id else "length")
    assert (last.prompt_tokens, last.completion_tokens) == (len(prompt), len(ref))
    text = tok.decode(prompt + ref, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)) :]
    assert "".join(s.text for s in steps) == text


def run_waves(model, tok, requests, waves: list[list[list[int]]], max_batch: int):
    """Submit `requests` (prompt, adapter, max_tokens) in waves, each from several threads: wave w+1 is submitted
    once a request of wave w has its first token, and the engine waits at step w+1 until wave w+1 is in, so
    every wave joins while the earlier ones decode. Returns {index: steps} and the (batch size, queue) per step."""
    submitted = [[threading.Event() for _ in wave] for wave in waves]
    first = [threading.Event() for _ in waves]
    seen: list[tuple[int, int]] = []
    waited: list[bool] = []

    def on_step(batch: int, queued: int) -> None:
        seen.append((batch, queued))
        if len(seen) < len(waves):
            waited.append(all(e.wait(60) for e in submitted[len(seen)]))

    engine = Engine(model, tok, max_batch=max_batch, on_step=on_step)
    engine.start()
    results: dict[int, list] = {}

    def client(w: int, t: int, indices: list[int]) -> None:
        if w:
            first[w - 1].wait(60)
        handles = [(i, engine.submit(requests[i][0], requests[i][1], greedy(tok, requests[i][2]))) for i in indices]
        submitted[w][t].set()
        for i, h in handles:
            results[i] = []
            for step in h:
                results[i].append(step)
                first[w].set()

    threads = [
        threading.Thread(target=client, args=(w, t, idx)) for w, wave in enumerate(waves) for t, idx in enumerate(wave)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    engine.stop(10)
    assert waited and all(waited), "a wave was not submitted in time"
    return results, seen


@pytest.mark.slow
def test_48_concurrent_requests_over_8_adapters_and_the_base_equal_each_run_alone(llama):
    model, tok = llama
    names = [None, *LLAMA_ADAPTERS]
    ps = prompts(tok, 48)
    requests = [(ps[i], names[i % len(names)], 3 + (i * 5) % 22) for i in range(48)]
    refs = [alone(model, tok, *r) for r in requests]
    assert len({tuple(alone(model, tok, ps[0], n, 8)) for n in names}) >= 6, "the adapters must change the output"
    waves = [[list(range(w * 16 + t, w * 16 + 16, 4)) for t in range(4)] for w in range(3)]  # 3 waves x 4 threads
    results, seen = run_waves(model, tok, requests, waves, max_batch=32)
    for i, (prompt, _, _) in enumerate(requests):
        check(tok, prompt, refs[i], results[i])
    assert max(b for b, _ in seen) == 32 and any(q for _, q in seen)  # a full batch, and the third wave waited


def test_gpt2_requests_over_adapters_equal_each_run_alone(gpt2):
    model, tok = gpt2
    names = [None, *GPT2_ADAPTERS]
    ps = prompts(tok, 12)
    requests = [(ps[i], names[i % len(names)], 2 + (i * 3) % 11) for i in range(12)]
    refs = [alone(model, tok, *r) for r in requests]
    results, _ = run_waves(model, tok, requests, [[[0, 2, 4], [1, 3, 5]], [[6, 8, 10], [7, 9, 11]]], max_batch=8)
    for i, (prompt, _, _) in enumerate(requests):
        check(tok, prompt, refs[i], results[i])


ENGINES: list[Engine] = []


@pytest.fixture(autouse=True)
def stop_engines():
    """A failed test's engine must not keep running on the shared model into the next test."""
    yield
    stop_all()


def test_seeded_sampling_does_not_depend_on_the_batch_company(llama):
    model, tok = llama
    ps = prompts(tok, 8)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    top = alone(model, tok, ps[3], "a4", 12)  # references first: once started, the engine owns the model
    engine = started(model, tok)
    solo = engine.submit(ps[3], "a4", params).result().token_ids
    company = [
        engine.submit(ps[i], [None, "a1", "a5"][i % 3], SamplingParams(max_tokens=4 + i, temperature=1.2, seed=i))
        for i in range(6)
    ]
    together = engine.submit(ps[3], "a4", params)
    more = [engine.submit(ps[i], "a2", greedy(tok, 9)) for i in range(3)]
    assert together.result().token_ids == solo
    other_seed = engine.submit(ps[3], "a4", SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=8))
    assert other_seed.result().token_ids != solo
    nucleus_of_one = engine.submit(ps[3], "a4", SamplingParams(max_tokens=12, temperature=0.9, top_p=1e-6, seed=1))
    assert nucleus_of_one.result().token_ids == top  # only the top token is left
    assert all(h.result().finish_reason in ("length", "stop") for h in company + more)
    engine.stop(10)
