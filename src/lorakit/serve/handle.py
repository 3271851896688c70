"""One submitted request as its client sees it: a stream of `Step`s, read from a thread or from asyncio.

The engine thread pushes steps; the client reads them by iterating the `Handle` (blocking) or with
`async for` (the hand-off goes through `loop.call_soon_threadsafe`). A reader that stops early (a client
that went away) cancels the request, so its slot is freed at the engine's next step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from .compose import RowKey


@dataclass(frozen=True)
class Step:
    """One event of a request's stream.

    Attributes:
        token_id: the token produced at this step; None on a final event that produced nothing.
        text: the new text since the previous step (stop strings are held back until safe).
        finish_reason: None while running; "stop", "length", "cancelled" or "error" on the last step.
        prompt_tokens: the prompt's length in tokens.
        completion_tokens: tokens produced so far (a stop token counts).
        error: on finish_reason "error", what went wrong.
        unavailable: on finish_reason "error", True when the server failed the request, not the request itself
            (the engine stopped or failed): a server answers 503 and the client may retry elsewhere.
    """

    token_id: int | None
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    unavailable: bool = False


@dataclass(frozen=True)
class Completion:
    """A whole request's result (`Handle.result()`): its text, token ids and why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    unavailable: bool = False


@dataclass(frozen=True)
class RequestStats:
    """Timing of one finished request, for metrics (`Engine(on_finish=...)`).

    Attributes:
        adapter: the request's adapter key: a name, None (the base), or a composition (`compose.RowKey`).
        ttft: seconds from submit to the first token (None when none came).
        per_token: mean seconds between later tokens (None with fewer than two tokens).
        queued: seconds the request waited before its prefill began.
    """

    adapter: RowKey
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    ttft: float | None
    per_token: float | None
    queued: float | None


class Handle:
    """A submitted request: iterate it (or `async for`) for its `Step`s; `cancel()` to give up its slot."""

    def __init__(self, adapter: RowKey, prompt_tokens: int) -> None:
        self.adapter = adapter
        self.prompt_tokens = prompt_tokens
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None  # prefill began
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.finished: Step | None = None  # the final step, once pushed
        self._cancelled = threading.Event()
        self._lock = threading.Condition()
        self._steps: deque[Step] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Step] | None = None
        self._result: Completion | None = None

    @property
    def cancelled(self) -> bool:
        """True once `cancel()` was called."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Give up: the engine ends the request (finish_reason "cancelled") and frees its slot at its next step."""
        self._cancelled.set()

    def _push(self, step: Step) -> None:
        """Called by the engine thread: hand one step to the reader, whichever way it reads."""
        now = time.perf_counter()
        if step.token_id is not None:
            self.first_token_at = self.first_token_at or now
            self.last_token_at = now
        with self._lock:
            if step.finish_reason is not None:
                self.finished = step
            if self._loop is not None and self._queue is not None:
                try:
                    self._loop.call_soon_threadsafe(self._queue.put_nowait, step)
                except RuntimeError:  # the reader's event loop is closed: nobody is listening any more
                    self._cancelled.set()
            else:
                self._steps.append(step)
                self._lock.notify_all()

    def __iter__(self) -> Iterator[Step]:
        """The steps, blocking until each is ready; the last has a finish_reason. Stopping early cancels."""
        done = False
        try:
            while not done:
                with self._lock:
                    while not self._steps:
                        self._lock.wait()
                    step = self._steps.popleft()
                done = step.finish_reason is not None
                yield step
        finally:
            if not done:
                self.cancel()

    async def __aiter__(self) -> AsyncIterator[Step]:
        """The steps, awaited on the running event loop; leaving early (e.g. a closed connection) cancels."""
        queue: asyncio.Queue[Step] = asyncio.Queue()
        with self._lock:
            if self._loop is not None:
                raise RuntimeError("this Handle already has an async reader")
            while self._steps:
                queue.put_nowait(self._steps.popleft())
            self._loop, self._queue = asyncio.get_running_loop(), queue
        done = False
        try:
            while not done:
                step = await queue.get()
                done = step.finish_reason is not None
                yield step
        finally:
            with self._lock:  # later steps wait in the handle again (e.g. for result() after leaving early)
                self._loop = self._queue = None
            if not done:
                self.cancel()

    def result(self) -> Completion:
        """Block until the request ends; its whole text, token ids and finish reason (read once, then kept)."""
        if self._result is not None:
            return self._result
        text, ids = [], []
        for step in self:
            text.append(step.text)
            if step.token_id is not None:
                ids.append(step.token_id)
        assert step.finish_reason is not None  # the iteration ends on the final step
        self._result = Completion(
            "".join(text),
            ids,
            step.finish_reason,
            step.prompt_tokens,
            step.completion_tokens,
            step.error,
            step.unavailable,
        )
        return self._result

    def stats(self) -> RequestStats | None:
        """Timing of the request once it has finished (None before)."""
        if self.finished is None:
            return None
        first, last, n = self.first_token_at, self.last_token_at, self.finished.completion_tokens
        return RequestStats(
            adapter=self.adapter,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=n,
            finish_reason=self.finished.finish_reason or "",
            ttft=None if first is None else first - self.submitted_at,
            per_token=None if first is None or last is None or n < 2 else (last - first) / (n - 1),
            queued=None if self.started_at is None else self.started_at - self.submitted_at,
        )
