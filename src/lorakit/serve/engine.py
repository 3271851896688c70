"""The continuous-batching engine: one loop, one decode step for every request, whatever its adapter.

A daemon thread owns the model. Each turn it runs the functions handed to `call` (adapter loads and unloads happen
between steps, never mid-forward), drops cancelled requests, prefills waiting ones (up to `max_batch` rows in all)
and decodes one token for every running row: one forward for the base and plain LoRA rows (`mixed_batch`, or the
one adapter or bare base they share), one of its own for each adapter the mixed path cannot run (DoRA; groups.py).
Each request samples with its own generator (`lorakit.generation.sampling`), so its tokens do not depend on its
batch company; a row whose sampling fails ends alone, a failed forward ends its rows, and serving goes on.

The loop is supervised: if it ever stops on an exception nothing else caught, every request in flight ends with
an error marked `unavailable`, `failure` says why, `submit` and `call` raise `EngineFailed`, and `on_failure(reason)`
tells the server (which answers 503 and exits non-zero, so that a supervisor restarts it).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import torch
from torch import nn

from ..adapters import list_adapters
from ..composition import RowSpec, row_key
from ..generation.kv import Batch, context_length
from ..generation.sampling import SamplingError, SamplingParams, generator, sample_rows
from .compose import check, missing, uses
from .detok import TextStream
from .groups import EngineAdapters, Group, Row, group_key, solo_adapters
from .handle import Handle, RequestStats, Step

T = TypeVar("T")


class QueueFull(Exception):
    """`submit` found `max_queue` requests already waiting (a server answers 429 and asks to retry)."""


class EngineClosed(RuntimeError):
    """`submit` after `stop()`: the engine accepts no new requests."""


class EngineFailed(EngineClosed):
    """The engine's loop stopped on an error: it serves nothing any more (the message says why)."""


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
        on_failure: called once with the reason if the loop ever stops on an error, on the engine thread.
        max_loaded: the adapters the mixed batches' slots are allocated for (`AdapterTable`'s capacity; they grow
            beyond it if more are loaded); None: as many as the model has when the loop starts.

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
        on_failure: Callable[[str], None] | None = None,
        max_loaded: int | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch} and max_queue={max_queue} are invalid: expected >= 1 and >= 0")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.on_step, self.on_finish, self.on_failure = on_step, on_finish, on_failure
        pad = getattr(tokenizer, "pad_token_id", None)
        self._pad_id = pad if isinstance(pad, int) else 0  # left padding is masked: any id does
        self._context = context_length(model)
        self._names = frozenset(list_adapters(model))  # refreshed after every `call`, read by `submit`
        self._solo = solo_adapters(model)  # adapters that run in a forward of their own (refreshed with _names)
        self._cond = threading.Condition()
        self._queue: deque[Row] = deque()
        self._groups: list[Group] = []  # the running rows, by forward
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._adapters = EngineAdapters(model, max_loaded)  # the adapters set around each forward
        self._accepting = True
        self.closed = threading.Event()  # set once stop() begins (or the loop failed): no new requests from then on
        self.failure: str | None = None  # why the loop stopped on an error; None while it is healthy
        self._shutdown = False
        self._thread: threading.Thread | None = None
        self.last_batch_size = 0
        self.steps = 0  # decode steps run so far

    # -- the client side (any thread) -------------------------------------------------------------

    @property
    def active(self) -> int:
        """Requests in the running batch (a request that has ended is not, even before its row leaves)."""
        with self._cond:
            return sum(not r.done for g in self._groups for r in g.rows)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        with self._cond:
            return sum(not r.done for r in self._queue)

    def _running(self) -> list[Row]:
        """Every running row, group after group (under the lock, or on the engine thread)."""
        return [r for g in self._groups for r in g.rows]

    def start(self) -> None:
        """Start the loop in a daemon thread (once)."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        # the caller's torch thread count: GEMMs on a new thread would otherwise run an OpenMP team of the machine's
        # default size (torch.set_num_threads sets it for the calling thread only), ~10x slower on a busy machine
        threads = torch.get_num_threads()
        self._thread = threading.Thread(
            target=self._supervised, args=(threads,), name="lorakit-serve-engine", daemon=True
        )
        self._thread.start()

    def submit(self, prompt_ids: Sequence[int], adapter: RowSpec, params: SamplingParams) -> Handle:
        """Queue one request: its `Handle` streams its steps. `adapter`: a loaded adapter's name, None (the base), or
        a weighted composition of loaded adapters (`lorakit.composition`), batched with every other row.

        Raises:
            LoraAdapterNotFound: (a KeyError) an adapter it names is not loaded.
            ValueError: an empty prompt, prompt + max_tokens over the model's context, a malformed composition, or
                a DoRA adapter in one (`compose.NotComposable`).
            QueueFull: `max_queue` requests already wait.
            EngineClosed: after `stop()`; `EngineFailed` (one of them) after the loop failed.
        """
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids is empty: expected at least one token")
        if self._context is not None and len(prompt) + params.max_tokens > self._context:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{len(prompt) + params.max_tokens} is over the model's context of {self._context} tokens"
            )
        check(key := row_key(adapter), self._names, self._solo)
        handle = Handle(key, len(prompt))
        stream = TextStream(self.tokenizer, prompt, params.stop)
        request = Row(prompt, key, params, handle, stream, generator(params.seed))
        with self._cond:
            if self.failure is not None:
                raise EngineFailed(f"the engine has failed ({self.failure}); the server must be restarted")
            if not self._accepting:
                raise EngineClosed("the engine is stopping: it accepts no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests already wait (max_queue={self.max_queue})")
            self._queue.append(request)
            self._cond.notify_all()
        return handle

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between two steps (e.g. load or unload an adapter); its result or exception.

        Raises `EngineFailed` once the loop has failed: the model's state is unknown.
        """
        with self._cond:
            if self.failure is not None:
                raise EngineFailed(f"the engine has failed ({self.failure}); the server must be restarted")
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
            self._solo = solo_adapters(self.model)
            self._adapters.sync()  # loads and unloads copy into / zero the mixed batches' slots here, not at a step

    def in_flight(self, adapter: str | None) -> int:
        """Requests using `adapter` (alone or in a composition; None: the bare base) that are running or waiting."""
        with self._cond:
            return sum(uses(r.adapter, adapter) for r in (*self._running(), *self._queue))

    def stop(self, timeout: float) -> None:
        """Stop accepting requests; let those in flight finish for up to `timeout` seconds, then end the rest with an
        error marked `unavailable` (the server was stopped, not the request wrong). Safe to call again."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._accepting = False
            self.closed.set()
            while (self._groups or self._queue) and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._shutdown = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        reason = f"the server stopped before this request finished (drain timeout of {timeout:g}s)"
        self._end_all(reason)

    def _end_all(self, reason: str) -> None:
        """End every request still waiting or running with an `unavailable` error (the loop is not running)."""
        with self._cond:
            rows = [*self._queue, *self._running()]
            self._queue.clear()
            self._groups = []
            calls = list(self._calls)
            self._calls.clear()
            self._cond.notify_all()
        for r in rows:
            if not r.done:
                self._finish(r, Step(None, r.stream.rest(), "error", len(r.prompt), r.produced, reason, True))
        for _, future in calls:
            future.set_exception(EngineClosed(reason))

    # -- the engine thread ------------------------------------------------------------------------

    def _supervised(self, threads: int) -> None:
        """The loop on `threads` torch threads, watched: an exception nothing else caught ends every request and
        marks the engine failed."""
        try:
            torch.set_num_threads(threads)
            self._loop()
        except BaseException as e:  # noqa: BLE001 - the engine must never die silently: say why, end what waits
            reason = f"{type(e).__name__}: {e}"
            with self._cond:
                self.failure = reason
                self._accepting = False
                self.closed.set()
            with contextlib.suppress(BaseException):  # the model may be mid-context: leave it as it can be left
                self._adapters.close()
            self._end_all(f"the engine failed ({reason}); the server must be restarted")
            if self.on_failure is not None:
                with contextlib.suppress(Exception):
                    self.on_failure(reason)

    def _loop(self) -> None:
        """Until stopped: calls, cancellations, admissions, one decode step; sleep when there is nothing to do."""
        with torch.no_grad():
            self._adapters.open(len(self._names - self._solo))
            while True:
                if not self._groups:
                    self._adapters.release()  # idle: the model is as it was outside
                with self._cond:
                    while not (self._shutdown or self._calls or self._queue or self._groups):
                        self._cond.wait()
                    if self._shutdown:
                        break
                    calls = list(self._calls)
                    self._calls.clear()
                if calls:
                    self._adapters.release()
                for fn, future in calls:
                    try:
                        future.set_result(self._run(fn))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller, who re-raises it
                        future.set_exception(e)
                self._drop_cancelled()
                self._admit()
                if self._groups:
                    self._decode()
        self._adapters.close()
        with self._cond:  # requests left at shutdown: stop() ends them after join
            self._cond.notify_all()

    def _finish(self, r: Row, step: Step) -> None:
        """Push the final step of `r` and report its stats (the caller removes it from the batch)."""
        r.done = True
        r.handle._push(step)
        stats = r.handle.stats()
        if self.on_finish is not None and stats is not None:
            with contextlib.suppress(Exception):  # a metrics hook never stops the engine
                self.on_finish(stats)

    def _prune(self) -> None:
        """Finished rows leave their groups; empty groups leave."""
        with self._cond:
            self._groups = [g for g in self._groups if g.keep([i for i, r in enumerate(g.rows) if not r.done])]
            self._cond.notify_all()  # stop() waits for the batch to empty

    def _drop_cancelled(self) -> None:
        """End cancelled requests, waiting or running, and free their slots."""
        with self._cond:
            gone = [r for r in self._queue if r.handle.cancelled]
            for r in gone:
                self._queue.remove(r)
        gone += [r for r in self._running() if r.handle.cancelled]
        for r in gone:
            self._finish(r, Step(None, "", "cancelled", len(r.prompt), r.produced))
        self._prune()

    def _admit(self) -> None:
        """Prefill waiting requests (up to max_batch rows in all), one forward per group; they join the running rows."""
        with self._cond:
            new = list(itertools.islice(self._queue, max(0, self.max_batch - len(self._running()))))
        if not new:
            return
        now = time.perf_counter()
        for r in new:
            r.handle.started_at = now
            if gone := missing(r.adapter, self._names):  # unloaded while the request waited
                self._finish(r, Step(None, "", "error", len(r.prompt), 0, f"adapter {gone[0]!r} is no longer loaded"))
        by_key: dict[str | None, list[Row]] = {}
        for r in new:
            if not r.done:
                by_key.setdefault(group_key(r.adapter, self._solo), []).append(r)
        joined = [(key, *prefilled) for key, rows in by_key.items() if (prefilled := self._prefill(key, rows))]
        with self._cond:  # they leave the queue only now, so stop() never finds them neither waiting nor running
            for _ in new:
                self._queue.popleft()  # only this thread removes, from the front; submit appends at the back
            for key, batch, rows in joined:
                group = next((g for g in self._groups if g.key == key), None)
                if group is None:
                    self._groups.append(Group(key, batch, rows))
                else:
                    group.join(batch, rows)
            self._cond.notify_all()
        for _, batch, rows in joined:
            self._emit(rows, batch.last.tolist())
        self._prune()

    def _prefill(self, key: str | None, rows: list[Row]) -> tuple[Batch, list[Row]] | None:
        """The rows' batch, their first tokens sampled into `last` (None when none is left to run)."""
        # a prompt asked for several times with one adapter (GRPO's n samples of each) is run once, its cache copied
        unique = {(r.adapter, tuple(r.prompt)): r for r in rows}
        try:
            with self._adapters.enter(key, [a for a, _ in unique]):
                logits, batch = Batch.prefill(self.model, [list(p) for _, p in unique], self._pad_id)
            if len(unique) < len(rows):
                where = {k: i for i, k in enumerate(unique)}
                index = [where[(r.adapter, tuple(r.prompt))] for r in rows]
                logits, batch = logits[index], batch.select(index)
        except Exception as e:  # noqa: BLE001 - the requests in this forward fail; the engine goes on
            for r in rows:
                self._finish(r, Step(None, "", "error", len(r.prompt), 0, f"{type(e).__name__}: {e}"))
            return None
        batch.last = self._sample(rows, logits, batch)
        return batch, rows

    def _sample(self, rows: list[Row], logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Each row's next token (B,); a row whose sampling fails ends alone (its slot holds a dummy token)."""
        tokens = sample_rows(logits, [r.params for r in rows], [r.gen for r in rows])
        for r, t in zip(rows, tokens, strict=True):
            if isinstance(t, SamplingError):
                self._finish(r, Step(None, r.stream.rest(), "error", len(r.prompt), r.produced, f"sampling: {t}"))
        ids = [t if isinstance(t, int) else self._pad_id for t in tokens]
        return torch.tensor(ids, dtype=torch.long, device=batch.mask.device)

    def _decode(self) -> None:
        """One forward per group for every running row; each samples its next token; finished rows leave."""
        total = 0
        for group in list(self._groups):
            rows = list(group.rows)
            try:
                self._adapters.hold(group)
                logits = group.batch.step(self.model)
            except Exception as e:  # noqa: BLE001 - every row of a failed forward fails (its cache is unknown)
                self._adapters.release()
                for r in rows:
                    self._finish(r, Step(None, "", "error", len(r.prompt), r.produced, f"{type(e).__name__}: {e}"))
                continue
            group.batch.last = self._sample(rows, logits, group.batch)
            total += len(rows)
            self._emit(rows, group.batch.last.tolist())
        self.steps += 1
        self.last_batch_size = total
        self._prune()
        if self.on_step is not None and total:
            with contextlib.suppress(Exception):
                self.on_step(total, self.queued)

    def _emit(self, rows: list[Row], tokens: list[int]) -> None:
        """Hand each row its new token's step (the caller prunes the rows that finished)."""
        for r, t in zip(rows, tokens, strict=True):
            if r.done:  # its sampling failed this step
                continue
            step = r.advance(t)
            if step.finish_reason is not None:
                self._finish(r, step)
            else:
                r.handle._push(step)
