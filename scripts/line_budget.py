"""Line budget: no file under src/ longer than 400 lines (STYLE.md: one concept per file, readable in one sitting).

Usage: python scripts/line_budget.py [ROOT] [--budget N] [--top K]

Prints the K largest files every run, then exits 1 naming each file over the budget (0 when none is).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SKIP_DIRS = {"__pycache__"}


def line_counts(root: Path) -> list[tuple[int, Path]]:
    """(lines, path) for every file under root, largest first (caches and build metadata skipped)."""
    counts = []
    for path in root.rglob("*"):
        parts = set(path.relative_to(root).parts)
        if not path.is_file() or parts & SKIP_DIRS or any(p.endswith(".egg-info") for p in parts):
            continue
        with path.open("rb") as f:
            counts.append((sum(1 for _ in f), path))
    return sorted(counts, key=lambda c: (-c[0], str(c[1])))


def main(argv: list[str] | None = None) -> int:
    """Print the largest files; return 1 if any is over the budget."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="src", type=Path)
    parser.add_argument("--budget", type=int, default=400)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args(argv)
    counts = line_counts(args.root)
    print(f"largest files under {args.root}/ (budget {args.budget} lines):")
    for n, path in counts[: args.top]:
        print(f"  {n:5d}  {path}")
    over = [(n, path) for n, path in counts if n > args.budget]
    sys.stdout.flush()
    for n, path in over:
        print(f"{path}: {n} lines, over the budget of {args.budget}", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
