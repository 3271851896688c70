"""lorakit.ui.progress: plain lines when piped, a rich display on a terminal, nested tasks in one display."""

from __future__ import annotations

import io

from lorakit.ui.progress import Progress, quiet


def test_piped_progress_is_plain_lines_with_a_done_line():
    out = io.StringIO()
    with Progress(out).task("tokenizing", total=3, unit="rows") as t:
        t.advance(3)
    lines = out.getvalue().splitlines()
    assert lines[0] == "tokenizing: 0/3 rows ..."
    assert lines[-1].startswith("tokenizing: 3/3 rows in ") and "\x1b" not in out.getvalue()


def test_nested_tasks_share_one_rich_display():
    out = io.StringIO()
    progress = Progress(out, rich=True)
    with progress.task("loading") as outer:  # a second rich Live inside the first would raise LiveError
        with progress.task("tokenizing", total=2, unit="rows") as inner:
            inner.advance(2)
        outer.advance()
    text = out.getvalue()
    assert "tokenizing: 2/2 rows in" in text and "loading" in text


def test_quiet_reports_nothing():
    with quiet().task("anything", total=1) as t:
        t.advance()
    assert t.done == 1
