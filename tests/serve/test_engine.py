"""The continuous-batching engine's request lifecycle on a real tiny llama with real adapters: sampling, stop
strings, cancel, a full queue, stop and its timeout, calls between steps, failing forwards and a supervised loop.

Greedy requests are checked against the same prompt run alone (`_engine.alone`); requests that race the engine
synchronise on events (its `on_step` hook, a handle's first step), never sleeps.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.serve import Engine, EngineClosed, EngineFailed, QueueFull, SamplingParams
from lorakit.serve.detok import TextStream

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
import _hf_models  # noqa: E402
from _engine import alone, greedy, prompts, started, stop_all  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops run faster on one thread, and two threads of this test do not fight over cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def stop_engines():
    """A failed test's engine must not keep running on the shared model into the next test."""
    yield
    stop_all()


def test_stop_strings_cut_the_text_before_them(llama):
    model, tok = llama
    prompt = prompts(tok, 5)[4]
    ref = alone(model, tok, prompt, "a3", 20)
    words = tok.decode(ref, skip_special_tokens=True).split()
    assert len(words) >= 6
    stop = f"{words[3]} {words[4]}"  # two tokens: the first is held back until the second decides
    full = tok.decode(prompt + ref, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)) :]
    engine = started(model, tok)
    steps = list(engine.submit(prompt, "a3", SamplingParams(max_tokens=20, stop=("never there", stop))))
    assert steps[-1].finish_reason == "stop"
    assert "".join(s.text for s in steps) == full[: full.index(stop)]
    assert steps[-1].completion_tokens < len(ref)
    unstopped = engine.submit(prompt, "a3", SamplingParams(max_tokens=len(ref), stop=("never there",))).result()
    assert (unstopped.text, unstopped.finish_reason) == (full, "length")  # held-back text is sent at the end
    engine.stop(10)


def test_multi_byte_characters_come_out_whole():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_hf_models.SENTENCES, vocab_size=300, min_frequency=1)  # ASCII: é, ö, 🙂 split in bytes
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    text = "the cat héllo wörld 🙂 sat 🙂🙂"
    ids = tok(text)["input_ids"]
    assert any("\ufffd" in tok.decode(ids[:k]) for k in range(len(ids)))  # some prefixes end inside a character
    stream = TextStream(tok, prompt=tok("one two")["input_ids"], stop=("🙂🙂",))
    pieces = [stream.push(t) for t in ids]
    assert all("\ufffd" not in p for p, _ in pieces)
    assert "".join(p for p, _ in pieces) == text[: text.index("🙂🙂")]
    assert pieces[-1][1] and not any(stopped for _, stopped in pieces[:-1])


def test_cancel_frees_the_slot_at_the_next_step(llama):
    model, tok = llama
    ps = prompts(tok, 4)
    ref = alone(model, tok, ps[2], "a2", 5)
    cancelled = threading.Event()
    engine = started(model, tok, max_batch=1, on_step=lambda b, q: cancelled.wait(60))
    long = engine.submit(ps[1], "a1", SamplingParams(max_tokens=100))
    waiting = engine.submit(ps[2], "a2", greedy(tok, 5))
    queued_then_cancelled = engine.submit(ps[3], None, greedy(tok, 5))
    assert (engine.active, engine.queued) == (0, 3) or engine.active == 1
    steps = iter(long)
    assert next(steps).token_id is not None
    long.cancel()
    queued_then_cancelled.cancel()
    cancelled.set()  # the engine's first decode step may finish; at the next one the slot is free
    rest = list(steps)
    assert rest[-1].finish_reason == "cancelled" and rest[-1].completion_tokens <= 2
    assert waiting.result().token_ids == ref  # it got the only slot
    assert queued_then_cancelled.result().finish_reason == "cancelled"
    assert queued_then_cancelled.result().completion_tokens == 0
    stopped_reading = engine.submit(ps[1], "a1", SamplingParams(max_tokens=100))
    for _ in stopped_reading:  # a reader that leaves early (a closed connection) cancels its request
        break
    assert stopped_reading.cancelled
    assert engine.submit(ps[0], None, greedy(tok, 3)).result().finish_reason in ("length", "stop")
    assert (engine.active, engine.queued, engine.in_flight("a1")) == (0, 0, 0)
    engine.stop(10)


def test_a_full_queue_refuses_and_bad_requests_name_the_problem(llama):
    model, tok = llama
    engine = Engine(model, tok, max_queue=2)  # not started: nothing leaves the queue
    ps = prompts(tok, 3)
    refs = [alone(model, tok, p, "a1", 4) for p in ps[:2]]
    first = [engine.submit(p, "a1", greedy(tok, 4)) for p in ps[:2]]
    assert engine.in_flight("a1") == 2 and engine.in_flight(None) == 0
    with pytest.raises(QueueFull, match="max_queue=2"):
        engine.submit(ps[2], None, greedy(tok, 4))
    with pytest.raises(KeyError, match="'nope'"):
        engine.submit(ps[2], "nope", greedy(tok, 4))
    with pytest.raises(ValueError, match=r"prompt \(3 tokens\) \+ max_tokens \(126\)"):
        engine.submit(ps[2][:3], None, greedy(tok, 126))
    with pytest.raises(ValueError, match="top_p=0"):
        SamplingParams(top_p=0)
    engine.start()
    assert [h.result().token_ids for h in first] == refs
    engine.stop(10)


def test_stop_lets_requests_finish_then_refuses_new_ones(llama):
    model, tok = llama
    ps = prompts(tok, 6)
    engine = started(model, tok, max_batch=2)
    handles = [engine.submit(p, "a5", greedy(tok, 6)) for p in ps]
    engine.stop(60)
    assert [h.result().token_ids for h in handles] == [alone(model, tok, p, "a5", 6) for p in ps]
    assert engine.closed.is_set()
    assert all(layer.mixed is None and not layer.disabled for layer in lk.lora_layers(model).values())  # as before
    with pytest.raises(EngineClosed):
        engine.submit(ps[0], None, greedy(tok, 2))


def test_stop_ends_what_is_left_at_its_timeout_with_an_unavailable_error(llama):
    model, tok = llama
    ps = prompts(tok, 2)
    engine = Engine(model, tok, max_batch=1)
    engine.on_step = lambda b, q: engine.closed.wait(60)  # hold the first step until stop() has begun
    engine.start()
    running = engine.submit(ps[0], None, SamplingParams(max_tokens=100))
    queued = engine.submit(ps[1], None, SamplingParams(max_tokens=100))
    steps = iter(running)
    next(steps)
    engine.stop(0)
    last = list(steps)[-1]
    assert (last.finish_reason, last.unavailable) == ("error", True) and "drain timeout of 0s" in last.error
    assert (queued.result().finish_reason, queued.result().completion_tokens) == ("error", 0)
    assert queued.result().unavailable
    never_started = Engine(model, tok)
    left = never_started.submit(ps[0], None, greedy(tok, 3))
    never_started.stop(0)
    assert (left.result().finish_reason, left.result().unavailable) == ("error", True)
    engine.stop(0)  # a second stop is harmless


def test_call_runs_on_the_engine_thread_between_steps(llama, tmp_path):
    model, tok = llama
    ps = prompts(tok, 3)
    ref = alone(model, tok, ps[1], "a6", 7)  # before the engine runs: it owns the model from then on
    engine = started(model, tok)
    running = engine.submit(ps[0], "a3", SamplingParams(max_tokens=100))
    next(iter(running_steps := iter(running)))
    seen = {}

    def load() -> None:  # an adapter loaded while another request decodes (100 steps: it is still running)
        seen["thread"], seen["running"] = threading.current_thread().name, running.finished is None
        lk.save_adapters(model, tmp_path / "late", name="a6")
        lk.load_adapters(model, tmp_path / "late", name="late")

    engine.call(load)
    assert seen == {"thread": "lorakit-serve-engine", "running": True}
    assert engine.submit(ps[1], "late", greedy(tok, 7)).result().token_ids == ref
    with pytest.raises(ZeroDivisionError):
        engine.call(lambda: 1 / 0)
    engine.call(lambda: lk.delete_adapter(model, "late"))
    with pytest.raises(KeyError, match="'late'"):
        engine.submit(ps[1], "late", greedy(tok, 7))
    running.cancel()
    assert list(running_steps)[-1].finish_reason == "cancelled"
    engine.stop(10)


def test_a_failing_forward_fails_its_requests_and_the_engine_goes_on(llama):
    model, tok = llama
    ps = prompts(tok, 4)
    poison = tok.unk_token_id  # in no other prompt
    fail = {"prefill with": poison, "decode": False}
    refs = alone(model, tok, ps[1], "a2", 20), alone(model, tok, ps[3], "a7", 6)

    def hook(module, args, kwargs):  # a real exception inside the model's forward
        ids = kwargs["input_ids"]
        if (ids == fail["prefill with"]).any() and ids.shape[1] > 1 or (fail["decode"] and ids.shape[1] == 1):
            raise RuntimeError("boom")

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        engine = started(model, tok)
        healthy = engine.submit(ps[1], "a2", greedy(tok, 20))
        steps = iter(healthy)
        first = next(steps).token_id  # running: the poisoned prompt is prefilled in a forward of its own
        bad = engine.submit([*ps[2], poison], "a2", greedy(tok, 5)).result()
        assert (bad.finish_reason, bad.completion_tokens, bad.error) == ("error", 0, "RuntimeError: boom")
        assert [first, *(s.token_id for s in steps)] == refs[0]  # the running request went on
        engine.call(lambda: fail.update(decode=True))
        broken = engine.submit(ps[3], None, greedy(tok, 5)).result()
        assert (broken.finish_reason, broken.completion_tokens) == ("error", 1)  # its first token came from prefill
        engine.call(lambda: fail.update(decode=False))
        assert engine.submit(ps[3], "a7", greedy(tok, 6)).result().token_ids == refs[1]
        engine.stop(10)
    finally:
        handle.remove()


def test_async_readers_and_timing_hooks(llama):
    model, tok = llama
    ps = prompts(tok, 3)
    refs = [alone(model, tok, p, a, 6) for p, a in zip(ps, ["a8", None, "a1"], strict=True)]
    finished, steps_seen = [], []
    engine = started(model, tok, on_finish=finished.append, on_step=lambda b, q: steps_seen.append((b, q)))

    async def client(prompt, adapter):
        return [s async for s in engine.submit(prompt, adapter, greedy(tok, 6))]

    async def leaves_early():
        async for _ in (h := engine.submit(ps[0], "a8", SamplingParams(max_tokens=100))):
            return h

    async def main():
        return await asyncio.gather(
            *(client(p, a) for p, a in zip(ps, ["a8", None, "a1"], strict=True)), leaves_early()
        )

    *results, gone = asyncio.run(main())
    assert [[s.token_id for s in r if s.token_id is not None] for r in results] == refs
    assert gone.cancelled and gone.result().finish_reason == "cancelled"
    engine.stop(10)
    by_adapter = {s.adapter: s for s in finished if s.finish_reason != "cancelled"}
    assert set(by_adapter) == {"a8", None, "a1"}
    for stats in by_adapter.values():
        assert stats.completion_tokens == 6 and stats.ttft > 0 and stats.per_token > 0 and stats.queued >= 0
    assert steps_seen and max(b for b, _ in steps_seen) >= 2


def within(handle, seconds: float = 60):
    """The handle's result, or AssertionError if the engine never ends it (a dead engine thread hangs its requests)."""
    box: list = []
    reader = threading.Thread(target=lambda: box.append(handle.result()), daemon=True)
    reader.start()
    reader.join(seconds)
    assert box, f"the request did not end within {seconds}s: the engine has stopped serving"
    return box[0]


def test_no_sampling_value_the_params_accept_stops_the_engine(llama):
    model, tok = llama
    ps = prompts(tok, 4)
    top = alone(model, tok, ps[1], "a3", 6)
    engine = started(model, tok)
    extreme = [
        SamplingParams(max_tokens=6, temperature=1e-45, seed=1),  # logits / 1e-45 overflowed float32: now greedy
        SamplingParams(max_tokens=6, temperature=1e-5, top_p=1e-300, seed=2),  # 1e-300 is 0 in float32
        SamplingParams(
            max_tokens=6, temperature=2.0, top_k=10**9, seed=2**64 + 5
        ),  # k past the vocabulary, seed past 2**64
        SamplingParams(max_tokens=6, temperature=1e300, top_k=1, seed=-(2**70)),  # top-1 is greedy whatever the rest
        SamplingParams(max_tokens=6, temperature=5e-324, top_p=5e-324, top_k=-1, seed=0),
    ]
    handles = [engine.submit(ps[1], "a3", p) for p in extreme]
    results = [within(h) for h in handles]
    assert all(r.finish_reason in ("stop", "length") for r in results), [r.error for r in results]
    assert results[0].token_ids == results[3].token_ids == results[4].token_ids == top  # all greedy in effect
    assert within(engine.submit(ps[2], None, greedy(tok, 3))).finish_reason in ("stop", "length")  # still serving
    engine.stop(10)


def test_a_row_whose_logits_cannot_be_sampled_fails_alone(llama):
    model, tok = llama
    ps = prompts(tok, 4)
    refs = [alone(model, tok, ps[i], a, 8) for i, a in ((1, "a2"), (3, None))]
    poison = tok.unk_token_id

    def nan_rows(module, args, output):  # the rows whose input holds the poison token get NaN logits
        ids = args[0] if args else None
        if ids is not None:
            output.logits[(ids == poison).any(-1)] = float("nan")
        return output

    hook = model.register_forward_hook(lambda m, a, kw, out: nan_rows(m, (kw.get("input_ids"),), out), with_kwargs=True)
    try:
        engine = started(model, tok)
        held = threading.Event()
        engine.on_step = lambda b, q: held.wait(60)  # the first decode step waits until all three are in
        ok = [engine.submit(ps[1], "a2", greedy(tok, 8)), engine.submit(ps[3], None, greedy(tok, 8))]
        bad = engine.submit([*ps[2], poison], "a2", SamplingParams(max_tokens=8, temperature=0.7, seed=3))
        held.set()
        failed = within(bad)
        assert (failed.finish_reason, failed.completion_tokens) == ("error", 0) and "sampling" in failed.error
        assert not failed.unavailable  # the request failed, not the server
        assert [within(h).token_ids for h in ok] == refs
        engine.stop(10)
    finally:
        hook.remove()


class Fatal(BaseException):
    """Nothing in the engine catches this (as a bug's exception in the loop would escape it)."""


def test_the_loop_is_supervised_when_it_dies_for_real(llama):
    model, tok = llama
    ps = prompts(tok, 3)
    trigger = tok.unk_token_id

    def hook(module, args, kwargs):  # a real exception inside the model's forward, at a prefill with the trigger
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1 and (ids == trigger).any():
            raise Fatal("the test's trigger")

    failures: list[str] = []
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        engine = started(model, tok, on_failure=failures.append)
        running = engine.submit(ps[1], None, SamplingParams(max_tokens=100))
        steps = iter(running)
        next(steps)
        killer = engine.submit([*ps[2], trigger], None, greedy(tok, 3))
        ended = [within(killer), within(running)]
        assert all(r.finish_reason == "error" and r.unavailable for r in ended)
        assert all("Fatal: the test's trigger" in r.error for r in ended)
        assert engine.failure == "Fatal: the test's trigger" and failures == [engine.failure]
        with pytest.raises(EngineFailed, match="the test's trigger"):
            engine.submit(ps[0], None, greedy(tok, 3))
        with pytest.raises(EngineFailed):
            engine.call(lambda: None)
        assert all(layer.mixed is None and not layer.disabled for layer in lk.lora_layers(model).values())
    finally:
        handle.remove()


def test_stop_strings_cost_their_own_text_not_the_text_times_the_stops(llama):
    """200 stop strings of 5,000 characters (each beginning like the text, so they stay partial matches) beside a
    16-token neighbour: the engine thread's CPU time stays within 2x that of the same requests without stops (the
    hold-back used to try every prefix of every stop string against the text at every token: 4.5x here)."""
    model, tok = llama
    ps = prompts(tok, 4)
    text = tok.decode(alone(model, tok, ps[2], None, 40), skip_special_tokens=True)
    stops = tuple((text[: 1 + i % 12] + "\x00" + str(i)).ljust(5000, "z") for i in range(200))
    assert len(set(stops)) == 200

    def run(stop: tuple[str, ...]) -> tuple[float, list[int]]:
        engine = started(model, tok)
        clock = time.pthread_getcpuclockid(engine._thread.ident)
        before = time.clock_gettime(clock)
        hostile = engine.submit(ps[2], None, SamplingParams(max_tokens=100, stop=stop))
        neighbour = engine.submit(ps[3], None, SamplingParams(max_tokens=16))
        out = within(hostile).token_ids
        within(neighbour)
        spent = time.clock_gettime(clock) - before
        engine.stop(10)
        return spent, out

    run(())  # warm up: the first run pays for lazy initialisations
    plain, plain_ids = run(())
    hostile, hostile_ids = run(stops)
    assert hostile_ids == plain_ids and len(hostile_ids) == 100  # no stop string matched
    print(f"engine CPU: {plain:.3f}s without stops, {hostile:.3f}s with 200 x 5,000-char stops")
    assert hostile < 2 * plain + 0.05, (plain, hostile)
