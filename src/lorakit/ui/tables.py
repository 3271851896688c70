"""Text tables: a `rich.table.Table` rendered to a plain string (no colour, no cursor codes).

`lorakit.summary`, `lorakit inspect` and the example print their tables through here, so every table
lines up the same way however long a module name is.
"""

from __future__ import annotations

from io import StringIO

from rich import box
from rich.console import Console, RenderableType
from rich.table import Table

WIDE = 10_000  # tables render at their natural width: a long module name is never cut or wrapped


def table(*columns: str, right: tuple[str, ...] = (), title: str | None = None) -> Table:
    """An empty table with these column headings (those named in `right` right-aligned), a rule under them.

    Examples:
        >>> t = table("module", "rank", right=("rank",))
        >>> t.add_row("layers.0.q_proj", "8")
        >>> print(to_text(t))
        module           rank
        ─────────────────────
        layers.0.q_proj     8
    """
    t = Table(
        box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), title=title, title_justify="left"
    )  # columns two spaces apart
    for name in columns:
        t.add_column(name, justify="right" if name in right else "left", no_wrap=True)
    return t


def key_values(pairs: list[tuple[str, str]]) -> Table:
    """A headerless two-column table: names on the left, values beside them.

    Examples:
        >>> print(to_text(key_values([("adapter", "out/a1"), ("kind", "PEFT layout")])))
        adapter  out/a1
        kind     PEFT layout
    """
    t = Table.grid(padding=(0, 2, 0, 0))
    t.add_column(no_wrap=True)
    t.add_column(no_wrap=True)
    for name, value in pairs:
        t.add_row(name, value)
    return t


def to_text(*renderables: RenderableType) -> str:
    """Render tables (and strings) as plain text, one after the other; lines end without padding."""
    out = StringIO()
    console = Console(file=out, width=WIDE, color_system=None, highlight=False, emoji=False, markup=False)
    for r in renderables:
        console.print(r)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())
