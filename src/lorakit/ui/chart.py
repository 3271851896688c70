"""A terminal line chart in braille dots (2×4 per cell), for the dashboard's live loss curves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.text import Text

# bit of each dot in a braille cell, indexed [column][row] (Unicode "Braille Patterns", U+2800 block)
_DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
LABEL_WIDTH = 8


def _fmt(v: float) -> str:
    """An axis label: 3 significant digits, scientific outside [1e-3, 1e4)."""
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.1e}"


def line_chart(
    series: Sequence[tuple[str, Sequence[tuple[float, float]], str]], width: int, height: int, log_y: bool | None = None
) -> Text:
    """Draw `(name, [(x, y), ...], style)` series in `width` columns and `height` rows (the x axis takes 2).

    The y axis is logarithmic when every value is positive and they span more than 20× (losses), or
    when `log_y` says so. Later series draw over earlier ones where they share a cell.

    Examples:
        >>> lines = line_chart([("a", [(0, 1.0), (1, 2.0)], "")], width=20, height=4).plain.splitlines()
        >>> print(lines[0]); print(lines[3])
               2 ┤     ⣀⡠⠔⠒⠉
                  0        1
    """
    points = [(x, y) for _, pts, _ in series for x, y in pts if math.isfinite(y)]
    plot_w, rows = max(width - LABEL_WIDTH - 2, 4), max(height - 2, 2)
    out = Text(no_wrap=True, overflow="crop")
    if not points:
        for _ in range(rows):
            out.append(" " * LABEL_WIDTH + " ┤\n", style="dim")
        out.append(" " * LABEL_WIDTH + " └" + "─" * plot_w, style="dim")
        return out
    ys = [y for _, y in points]
    if log_y is None:
        log_y = min(ys) > 0 and max(ys) / min(ys) > 20
    lo, hi = _scaled(min(ys), log_y), _scaled(max(ys), log_y)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    x_lo, x_hi = min(x for x, _ in points), max(x for x, _ in points)
    grid = _Grid(plot_w * 2, rows * 4, x_lo, (x_hi - x_lo) or 1.0, lo, hi, log_y)
    for _, pts, style in series:
        grid.draw(pts, style)
    _draw_rows(out, grid, rows, plot_w)
    left, right = f"{x_lo:g}", f"{x_hi:g}"
    axis = " " * LABEL_WIDTH + " └" + "─" * plot_w
    out.append(axis + "\n", style="dim")
    out.append(" " * (LABEL_WIDTH + 2) + left + right.rjust(plot_w - len(left)), style="dim")
    return out


def _scaled(v: float, log_y: bool) -> float:
    """A y value on the chart's scale: its log10 on a logarithmic axis."""
    return math.log10(v) if log_y else v


@dataclass
class _Grid:
    """The chart's dots (`dots_w` × `dots_h`), kept as braille cells: (row, column) -> (bits, style)."""

    dots_w: int
    dots_h: int
    x_lo: float
    x_span: float
    lo: float  # the y range, on the chart's scale
    hi: float
    log_y: bool
    cells: dict[tuple[int, int], tuple[int, str]] = field(default_factory=dict)

    def dot(self, px: int, py: int, style: str) -> None:
        """Set dot (px, py), in `style` (a later series over an earlier one)."""
        key = (py // 4, px // 2)
        bits = self.cells.get(key, (0, style))[0] | _DOTS[px % 2][py % 4]
        self.cells[key] = (bits, style)

    def draw(self, pts: Sequence[tuple[float, float]], style: str) -> None:
        """One series' points, each joined to the previous one by the dots of a straight line."""
        prev = None
        for x, y in pts:
            if not math.isfinite(y):
                continue
            px = round((x - self.x_lo) / self.x_span * (self.dots_w - 1))
            py = round((self.hi - _scaled(y, self.log_y)) / (self.hi - self.lo) * (self.dots_h - 1))
            if prev is None:
                self.dot(px, py, style)
            else:
                n = max(abs(px - prev[0]), abs(py - prev[1]), 1)
                for i in range(1, n + 1):
                    self.dot(round(prev[0] + (px - prev[0]) * i / n), round(prev[1] + (py - prev[1]) * i / n), style)
            prev = (px, py)


def _draw_rows(out: Text, grid: _Grid, rows: int, plot_w: int) -> None:
    """The plot's rows onto `out`, each after its y label (top, bottom and, with 5 rows or more, middle)."""
    hi, lo = grid.hi, grid.lo
    label_rows = {0: hi, rows - 1: lo}
    if rows >= 5:  # a middle label, at the value the middle row's dots stand for
        label_rows[(rows - 1) // 2] = hi - (hi - lo) * ((rows - 1) // 2 * 4 + 1.5) / (grid.dots_h - 1)
    for r in range(rows):
        value = label_rows.get(r)
        label = _fmt(10**value if grid.log_y else value) if value is not None else ""
        out.append(f"{label:>{LABEL_WIDTH}} ┤", style="dim")
        for c in range(plot_w):
            bits, style = grid.cells.get((r, c), (0, ""))
            out.append(chr(0x2800 + bits) if bits else " ", style=style or None)
        out.append("\n")
