"""Admission: waiting requests are prefilled a chunk at a time, between the running rows' decode steps.

Each loop turn the engine moves waiting requests (up to `max_batch` rows in all, running and prefilling) into
prefill jobs, one per group of the forward they will run in, and runs at most `prefill_chunk` prompt tokens of
them (rows x columns, left padding included; at least one column): a long prompt is prefilled over several turns
while the running rows keep decoding a token per turn, instead of stalling them for its whole prefill. A job whose
prompts are done samples its rows' first tokens and they join their group (`Group.join`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..generation.kv import Batch, Prefill
from .compose import RowKey
from .groups import Group, Row, group_key
from .handle import Step


@dataclass(eq=False)
class Job:
    """Rows prefilled together (one forward per chunk), over their unique prompts."""

    key: str | None  # the group they join (groups.group_key of the rows' adapter)
    rows: list[Row]
    unique: list[tuple[RowKey, tuple[int, ...]]]  # (adapter, prompt): a prompt asked for n times is run once
    prefill: Prefill

    @property
    def tokens(self) -> int:
        """Prompt tokens a column of this job runs (its unique rows)."""
        return len(self.unique)


class Admission:
    """The engine's prefill jobs, in arrival order (only the engine thread touches them)."""

    def __init__(self, engine: Any, chunk: int) -> None:  # the Engine that owns it (engine.py imports this file)
        if chunk < 1:
            raise ValueError(f"prefill_chunk={chunk} is invalid: expected >= 1 tokens")
        self.engine, self.chunk = engine, chunk
        self.jobs: deque[Job] = deque()

    def rows(self) -> list[Row]:
        """The rows being prefilled."""
        return [r for job in self.jobs for r in job.rows]

    def admit(self) -> None:
        """Waiting requests (up to max_batch rows running or prefilling) leave the queue for new prefill jobs."""
        e = self.engine
        with e._cond:
            n = max(0, e.max_batch - len(e._running()))
            new = [e._queue.popleft() for _ in range(min(n, len(e._queue)))]
            by_key: dict[str | None, list[Row]] = {}
            for r in new:
                r.handle.started_at = time.perf_counter()
                if gone := e._unloaded(r.adapter):  # unloaded while the request waited
                    e._finish(r, Step(None, "", "error", len(r.prompt), 0, f"adapter {gone[0]!r} is no longer loaded"))
                else:
                    by_key.setdefault(group_key(r.adapter, e._solo), []).append(r)
            for key, rows in by_key.items():  # rows leave the queue and become prefilling under one lock
                unique = list({(r.adapter, tuple(r.prompt)): r for r in rows})
                self.jobs.append(Job(key, rows, unique, Prefill(e.model, [list(p) for _, p in unique], e._pad_id)))

    def advance(self) -> None:
        """Run up to `chunk` prompt tokens of the jobs, oldest first; finished jobs join their groups."""
        budget = self.chunk
        while self.jobs and budget > 0:
            job = self.jobs[0]
            columns = min(job.prefill.remaining, max(1, budget // job.tokens))
            budget -= columns * job.tokens
            batch = self._run(job, columns)
            if job.prefill.remaining == 0:  # done, or failed
                self.jobs.popleft()
            if batch is not None:
                self._join(job, batch)

    def _run(self, job: Job, columns: int) -> Batch | None:
        """One chunk of the job; its rows' batch with their first tokens once its prompts are done, else None."""
        e = self.engine
        try:
            with e._adapters.enter(job.key, [a for a, _ in job.unique]):
                logits = job.prefill.run(e.model, columns)
            if logits is None:
                return None
            batch = job.prefill.batch
            if len(job.unique) < len(job.rows):
                where = {k: i for i, k in enumerate(job.unique)}
                index = [where[(r.adapter, tuple(r.prompt))] for r in job.rows]
                logits, batch = logits[index], batch.select(index)
        except Exception as ex:  # noqa: BLE001 - the requests in this forward fail; the engine goes on
            job.prefill.done = job.prefill.ids.shape[1]  # the job is over
            for r in job.rows:
                if not r.done:
                    e._finish(r, Step(None, "", "error", len(r.prompt), 0, f"{type(ex).__name__}: {ex}"))
            return None
        batch.last = e._sample(job.rows, logits, batch)
        return batch

    def _join(self, job: Job, batch: Batch) -> None:
        """The job's rows join their group (a new one if none runs), then get their first tokens."""
        e = self.engine
        with e._cond:
            group = next((g for g in e._groups if g.key == job.key), None)
            if group is None:
                e._groups.append(Group(job.key, batch, job.rows))
            else:
                group.join(batch, job.rows)
            e._cond.notify_all()
        e._emit(job.rows, batch.last.tolist())
        e._prune()
