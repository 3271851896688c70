"""Number formatting shared by the plain log and the dashboard (both import it; it imports neither)."""

from __future__ import annotations


def fmt_duration(seconds: float) -> str:
    """`1:02:03`, `2:03` style.

    Examples:
        >>> fmt_duration(3723.4), fmt_duration(65)
        ('1:02:03', '1:05')
    """
    s = int(round(max(seconds, 0.0)))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
