"""The continuous-batching engine: one loop, one forward per decode step for every request, whatever its adapter.

A daemon thread owns the model. Each turn of its loop it runs the functions handed to `call` (adapter
load and unload happen between steps, never mid-forward), drops cancelled requests, prefills the
waiting ones (up to `max_batch` rows in all) in one left-padded forward and merges them into the
running batch, then runs one decode step for all rows: a mixed-adapter batch
(`lorakit.adapters.mixed_batch`), or the plain adapter or bare base when every row uses the same one.
Finished rows leave the batch at once. Each request samples with its own generator, so its tokens do not
depend on its batch company; a failed forward ends the requests in it with finish_reason "error" and the
engine goes on serving.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from ..adapters import disable_adapters, list_adapters, mixed_batch, use_adapter
from ..errors import LoraAdapterNotFound
from .detok import TextStream
from .handle import Handle, RequestStats, Step
from .kv import Batch
from .sampling import SamplingParams, generator, sample_rows

T = TypeVar("T")


class QueueFull(Exception):
    """`submit` found `max_queue` requests already waiting (a server answers 429 and asks to retry)."""


class EngineClosed(RuntimeError):
    """`submit` after `stop()`: the engine accepts no new requests."""


@dataclass(eq=False)
class _Request:
    """A request inside the engine: what it asked for and how far it got."""

    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    handle: Handle
    stream: TextStream
    gen: torch.Generator
    produced: int = 0
    done: bool = field(default=False)


def _context_length(model: nn.Module) -> int | None:
    """The model's longest sequence (max_position_embeddings), or None when its config does not say."""
    config = getattr(model, "config", None)
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) else None


@contextlib.contextmanager
def _adapters(model: nn.Module, rows: Sequence[str | None]) -> Iterator[None]:
    """Row i runs adapter rows[i]: the bare base or one adapter as themselves, several as a mixed batch."""
    distinct = set(rows)
    if distinct == {None}:
        ctx: contextlib.AbstractContextManager[Any] = disable_adapters(model)
    elif len(distinct) == 1:
        ctx = use_adapter(model, rows[0])
    else:
        ctx = mixed_batch(model, rows)
    with ctx:
        yield


class Engine:
    """Serves many requests over many adapters of one causal LM in one continuously batched loop.

    Args:
        model: a causal LM (Llama- or GPT-2-style) with its adapters loaded by name
            (`lorakit.load_adapters(model, dir, name=...)`); the engine puts it in eval mode.
        tokenizer: its tokenizer (for the text of each step and stop strings).
        max_batch: the most requests decoded together; more wait in the queue.
        max_queue: the most waiting requests; `submit` raises `QueueFull` beyond.
        on_step: called after each decode step with (batch size, queue depth), on the engine thread.
        on_finish: called with each finished request's `RequestStats`, on the engine thread.

    Start it, `submit` token ids with an adapter name (None: the base) and `SamplingParams`, and read the
    returned `Handle` (`for step in handle`, `async for step in handle`, or `handle.result()`); `stop` at the end.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        max_batch: int = 16,
        max_queue: int = 256,
        on_step: Callable[[int, int], None] | None = None,
        on_finish: Callable[[RequestStats], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch} and max_queue={max_queue} are invalid: expected >= 1 and >= 0")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.on_step, self.on_finish = on_step, on_finish
        pad = getattr(tokenizer, "pad_token_id", None)
        self._pad_id = pad if isinstance(pad, int) else 0  # left padding is masked: any id does
        self._context = _context_length(model)
        self._names = frozenset(list_adapters(model))  # refreshed after every `call`, read by `submit`
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._active: list[_Request] = []  # the rows of self._batch, in order
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._batch: Batch | None = None
        self._held: tuple[tuple[str | None, ...], contextlib.ExitStack] | None = None  # see _hold
        self._accepting = True
        self.closed = threading.Event()  # set once stop() begins: no new requests from then on
        self._shutdown = False
        self._thread: threading.Thread | None = None
        self.last_batch_size = 0
        self.steps = 0  # decode steps run so far

    # -- the client side (any thread) -------------------------------------------------------------

    @property
    def active(self) -> int:
        """Requests in the running batch."""
        with self._cond:
            return len(self._active)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        with self._cond:
            return len(self._queue)

    def start(self) -> None:
        """Start the loop in a daemon thread (once)."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._thread = threading.Thread(target=self._loop, name="lorakit-serve-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: Sequence[int], adapter: str | None, params: SamplingParams) -> Handle:
        """Queue one request: its `Handle` streams its steps. `adapter` is a loaded adapter's name or None (the base).

        Raises:
            LoraAdapterNotFound: (a KeyError) no adapter of that name is loaded.
            ValueError: an empty prompt, or prompt + max_tokens longer than the model's context.
            QueueFull: `max_queue` requests already wait.
            EngineClosed: after `stop()`.
        """
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids is empty: expected at least one token")
        if self._context is not None and len(prompt) + params.max_tokens > self._context:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{len(prompt) + params.max_tokens} is over the model's context of {self._context} tokens"
            )
        if adapter is not None and adapter not in self._names:
            raise LoraAdapterNotFound(f"no adapter named {adapter!r}; the model has {sorted(self._names)}")
        handle = Handle(adapter, len(prompt))
        request = _Request(
            prompt, adapter, params, handle, TextStream(self.tokenizer, prompt, params.stop), generator(params.seed)
        )
        with self._cond:
            if not self._accepting:
                raise EngineClosed("the engine is stopping: it accepts no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests already wait (max_queue={self.max_queue})")
            self._queue.append(request)
            self._cond.notify_all()
        return handle

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between two steps (e.g. load or unload an adapter); its result or exception."""
        with self._cond:
            direct = self._thread is None or not self._thread.is_alive() or threading.current_thread() is self._thread
            if not direct:
                future: Future[T] = Future()
                self._calls.append((fn, future))
                self._cond.notify_all()
        return self._run(fn) if direct else future.result()

    def _run(self, fn: Callable[[], T]) -> T:
        """Run `fn`, then note the adapters the model has now."""
        try:
            return fn()
        finally:
            self._names = frozenset(list_adapters(self.model))

    def in_flight(self, adapter: str | None) -> int:
        """Requests using `adapter` (None: the base) that are running or waiting."""
        with self._cond:
            return sum(r.adapter == adapter for r in (*self._active, *self._queue))

    def stop(self, timeout: float) -> None:
        """Stop accepting requests; let those in flight finish for up to `timeout` seconds, then cancel the rest."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._accepting = False
            self.closed.set()
            while (self._active or self._queue) and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._shutdown = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        for r in [*self._queue, *self._active]:  # never started, or the loop has left: end them here
            self._finish(r, Step(None, r.stream.rest(), "cancelled", len(r.prompt), r.produced))
        self._queue.clear()
        self._active.clear()

    # -- the engine thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        """Until stopped: calls, cancellations, admissions, one decode step; sleep when there is nothing to do."""
        with torch.no_grad():
            while True:
                if not self._active:
                    self._release()  # idle: the model is as it was outside
                with self._cond:
                    while not (self._shutdown or self._calls or self._queue or self._active):
                        self._cond.wait()
                    if self._shutdown:
                        break
                    calls = list(self._calls)
                    self._calls.clear()
                if calls:
                    self._release()
                for fn, future in calls:
                    try:
                        future.set_result(self._run(fn))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller, who re-raises it
                        future.set_exception(e)
                self._drop_cancelled()
                self._admit()
                if self._active:
                    self._decode()
        self._release()
        with self._cond:  # requests left at shutdown: stop() cancels them after join
            self._cond.notify_all()

    def _finish(self, r: _Request, step: Step) -> None:
        """Push the final step of `r` and report its stats (the caller removes it from the batch)."""
        r.done = True
        r.handle._push(step)
        stats = r.handle.stats()
        if self.on_finish is not None and stats is not None:
            with contextlib.suppress(Exception):  # a metrics hook never stops the engine
                self.on_finish(stats)

    def _keep(self, rows: list[int]) -> None:
        """Only these rows of the running batch go on."""
        with self._cond:
            if len(rows) == len(self._active):
                return
            self._active = [self._active[i] for i in rows]
            self._batch = self._batch.select(rows) if rows and self._batch is not None else None
            self._cond.notify_all()  # stop() waits for the batch to empty

    def _drop_cancelled(self) -> None:
        """End cancelled requests, waiting or running, and free their slots."""
        with self._cond:
            gone = [r for r in self._queue if r.handle.cancelled]
            for r in gone:
                self._queue.remove(r)
        gone += [r for r in self._active if r.handle.cancelled]
        for r in gone:
            self._finish(r, Step(None, "", "cancelled", len(r.prompt), r.produced))
        self._keep([i for i, r in enumerate(self._active) if not r.done])

    def _admit(self) -> None:
        """Prefill waiting requests (up to max_batch rows in all) in one forward; they join the running batch."""
        with self._cond:
            new = list(itertools.islice(self._queue, max(0, self.max_batch - len(self._active))))
        if not new:
            return
        joined = self._prefill(new)
        with self._cond:  # they leave the queue only now, so stop() never finds them neither waiting nor running
            for _ in new:
                self._queue.popleft()  # only this thread removes, from the front; submit appends at the back
            if joined is not None:
                batch, rows = joined
                self._batch = batch if self._batch is None else self._batch.merge(batch)
                self._active.extend(rows)
            self._cond.notify_all()
        if joined is not None:
            self._emit(batch.last.tolist(), range(len(self._active) - len(rows), len(self._active)))

    def _prefill(self, new: list[_Request]) -> tuple[Batch, list[_Request]] | None:
        """The new rows' batch (their first tokens sampled into `last`), or None when none is left to run."""
        now = time.perf_counter()
        for r in new:
            r.handle.started_at = now
            if r.adapter is not None and r.adapter not in self._names:  # unloaded while the request waited
                self._finish(r, Step(None, "", "error", len(r.prompt), 0, f"adapter {r.adapter!r} is no longer loaded"))
        rows = [r for r in new if not r.done]
        if not rows:
            return None
        self._release()
        try:
            with _adapters(self.model, [r.adapter for r in rows]):
                logits, batch = Batch.prefill(self.model, [r.prompt for r in rows], self._pad_id)
        except Exception as e:  # noqa: BLE001 - the requests in this forward fail; the engine goes on
            for r in rows:
                self._finish(r, Step(None, "", "error", len(r.prompt), 0, f"{type(e).__name__}: {e}"))
            return None
        tokens = sample_rows(logits, [r.params for r in rows], [r.gen for r in rows])
        batch.last = torch.tensor(tokens, dtype=torch.long, device=batch.mask.device)
        return batch, rows

    def _decode(self) -> None:
        """One forward for every running row; each samples its next token; finished rows leave."""
        assert self._batch is not None, "a running request always has its row in the batch"
        rows = list(self._active)
        try:
            self._hold(tuple(r.adapter for r in rows))
            logits = self._batch.step(self.model)
        except Exception as e:  # noqa: BLE001 - every row of a failed step fails (its cache is unknown); serving goes on
            self._release()
            for r in rows:
                self._finish(r, Step(None, "", "error", len(r.prompt), r.produced, f"{type(e).__name__}: {e}"))
            self._keep([])
            return
        tokens = sample_rows(logits, [r.params for r in rows], [r.gen for r in rows])
        self._batch.last = torch.tensor(tokens, dtype=torch.long, device=self._batch.mask.device)
        self.steps += 1
        self.last_batch_size = len(rows)
        self._emit(tokens, range(len(rows)))
        if self.on_step is not None:
            with contextlib.suppress(Exception):
                self.on_step(len(rows), self.queued)

    def _hold(self, rows: tuple[str | None, ...]) -> None:
        """Set the rows' adapters and keep them set across steps while the rows stay the same (entering a mixed
        batch reads every layer's adapters, which costs as much as a decode step of a small model)."""
        if self._held is not None and self._held[0] == rows:
            return
        self._release()
        stack = contextlib.ExitStack()
        stack.enter_context(_adapters(self.model, rows))
        self._held = (rows, stack)

    def _release(self) -> None:
        """Undo `_hold` (before a prefill, a `call`, or leaving): the model is as it was outside."""
        if self._held is not None:
            held, self._held = self._held, None
            held[1].close()

    def _emit(self, tokens: list[int], rows: range) -> None:
        """Hand each row its new token's step; rows that finished leave the batch."""
        for t, i in zip(tokens, rows, strict=True):
            r = self._active[i]
            r.produced += 1
            n, p = len(r.prompt), r.params
            if t in p.stop_token_ids:
                self._finish(r, Step(t, r.stream.rest(), "stop", n, r.produced))
                continue
            text, stopped = r.stream.push(t)
            if stopped:
                self._finish(r, Step(t, text, "stop", n, r.produced))
            elif r.produced >= p.max_tokens:
                self._finish(r, Step(t, text + r.stream.rest(), "length", n, r.produced))
            else:
                r.handle._push(Step(t, text, None, n, r.produced))
        self._keep([i for i, r in enumerate(self._active) if not r.done])
