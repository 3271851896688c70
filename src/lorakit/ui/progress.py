"""Progress of the slow steps outside the training loop (loading a model, tokenizing, packing, merging).

    with progress.task("tokenizing", total=len(rows), unit="rows") as t:
        for row in rows:
            ...
            t.advance()

On a terminal it is a rich progress bar on stderr; piped, it is plain lines on stderr (`<description>:
<done>/<total> <unit>` at most once a second, and a last line with the elapsed time), so a log never
goes silent for long and never fills with bars. `quiet()` reports nothing (library use, tests).
Stdout stays free for results (`--json`, predictions).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from .fmt import fmt_duration

PLAIN_INTERVAL_S = 1.0  # piped output: at most one line a second per task


class Task:
    """One running step: `advance(n)` as work is done; `total` may be None (a spinner, no percentage)."""

    def __init__(self, reporter: Progress, description: str, total: int | None, unit: str) -> None:
        self.reporter, self.description, self.total, self.unit = reporter, description, total, unit
        self.done = 0
        self.started = self.last_line = time.perf_counter()
        self.rich_id: int | None = None

    def advance(self, n: int = 1) -> None:
        """Count `n` more units done."""
        self.done += n
        self.reporter._advanced(self, n)

    def line(self, final: bool = False) -> str:
        """The plain-text state: `tokenizing: 120/400 rows` (and the elapsed time when `final`)."""
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        counted = f": {count} {self.unit}" if self.total is not None or self.done else ""
        secs = time.perf_counter() - self.started
        took = (f" in {secs:.1f} s" if secs < 60 else f" in {fmt_duration(secs)}") if final else " ..."
        return f"{self.description}{counted}{took}"


class Progress:
    """Reports tasks on `stream` (stderr): a rich bar when it is a terminal, plain lines otherwise.

    Examples:
        >>> import io
        >>> out = io.StringIO()
        >>> with Progress(out).task("reading", total=2, unit="files") as t:
        ...     t.advance(2)
        >>> out.getvalue().splitlines()[0]
        'reading: 0/2 files ...'
    """

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True, rich: bool | None = None) -> None:
        self.stream = stream
        self.enabled = enabled
        target = stream or sys.stderr
        self.rich = (rich if rich is not None else target.isatty()) and enabled
        self._bar: Any = None  # the live rich.progress.Progress while a rich task runs

    @contextmanager
    def task(self, description: str, total: int | None = None, unit: str = "") -> Iterator[Task]:
        """A step shown while it runs; it is marked done (with its time) when the block ends."""
        t = Task(self, description, total, unit)
        if not self.enabled:
            yield t
            return
        if self.rich:
            yield from self._rich_task(t)
            return
        self._write(t.line())
        yield t
        self._write(t.line(final=True))

    def _rich_task(self, t: Task) -> Iterator[Task]:
        """The task as a transient rich bar, then one line saying it is done; a task inside a running one joins
        its display (rich allows one live display at a time)."""
        if self._bar is not None:
            bar = self._bar
            t.rich_id = bar.add_task(t.description, total=t.total)
            try:
                yield t
            finally:
                bar.remove_task(t.rich_id)
            bar.console.print(f"[green]✓[/green] {t.line(final=True)}", highlight=False)
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        console = Console(file=self.stream or sys.stderr)
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
        with RichProgress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
            t.rich_id = bar.add_task(t.description, total=t.total)
            self._bar = bar
            try:
                yield t
            finally:
                self._bar = None
        console.print(f"[green]✓[/green] {t.line(final=True)}", highlight=False)

    def _advanced(self, t: Task, n: int) -> None:
        """Show the task's new state: the bar at once, a plain line at most once a second."""
        if not self.enabled:
            return
        bar = self._bar
        if self.rich and bar is not None and t.rich_id is not None:
            bar.advance(t.rich_id, n)
            return
        now = time.perf_counter()
        if not self.rich and now - t.last_line >= PLAIN_INTERVAL_S:
            t.last_line = now
            self._write(t.line())

    def _write(self, line: str) -> None:
        """One plain line, flushed."""
        stream = self.stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()


def quiet() -> Progress:
    """A Progress that reports nothing (the default for library calls)."""
    return Progress(enabled=False)
