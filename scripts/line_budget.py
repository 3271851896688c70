"""Line budget: no file longer than 400 lines, no function in src/ longer than pyproject's max-function-lines.

STYLE.md: one concept per file, readable in one sitting; a function reads in one screen. The function rule is
stated once, in pyproject.toml (`[tool.lorakit] max-function-lines`), and counts a function from its `def` line to
its last line (decorators, signature, docstring and nested definitions included).

Usage: python scripts/line_budget.py [ROOT ...] [--budget N] [--top K] [--functions ROOT ...] [--max-function-lines N]

Prints the K largest files of each ROOT every run, then exits 1 naming each file over the budget and each
function (under a --functions root) over the limit; 0 when there is none.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: tomli, a dependency there
    import tomli as tomllib

SKIP_DIRS = {"__pycache__"}
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


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


def max_function_lines(pyproject: Path = PYPROJECT) -> int:
    """The function-length rule as pyproject.toml states it (`[tool.lorakit] max-function-lines`)."""
    with pyproject.open("rb") as f:
        return int(tomllib.load(f)["tool"]["lorakit"]["max-function-lines"])


def long_functions(root: Path, limit: int) -> list[tuple[int, Path, int, str]]:
    """(lines, path, line number, qualified name) of every function in a .py file under root longer than limit."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if set(path.relative_to(root).parts) & SKIP_DIRS:
            continue
        found += [(n, path, line, name) for n, line, name in _functions(ast.parse(path.read_bytes())) if n > limit]
    return found


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[int, int, str]]:
    """(lines from def to end, def line, dotted name) of each function and method in tree, nested ones included."""
    out = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                out.append((node.end_lineno - node.lineno + 1, node.lineno, name))
            out += _functions(node, name + ".")
        else:
            out += _functions(node, prefix)
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the largest files; return 1 if any file is over the budget or any function over the limit."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="*", default=[Path("src")], type=Path, metavar="ROOT")
    parser.add_argument("--budget", type=int, default=400)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--functions", nargs="*", default=[], type=Path, metavar="ROOT")
    parser.add_argument("--max-function-lines", type=int, default=None, help="default: pyproject.toml's")
    args = parser.parse_args(argv)
    over = []
    for root in args.roots:
        counts = line_counts(root)
        print(f"largest files under {root}/ (budget {args.budget} lines):")
        for n, path in counts[: args.top]:
            print(f"  {n:5d}  {path}")
        over += [f"{path}: {n} lines, over the budget of {args.budget}" for n, path in counts if n > args.budget]
    limit = args.max_function_lines
    if args.functions and limit is None:
        limit = max_function_lines()
    for root in args.functions:
        long = long_functions(root, limit)
        print(f"functions under {root}/ over {limit} lines: {len(long)}")
        over += [f"{path}:{line}: {name} is {n} lines, over the limit of {limit}" for n, path, line, name in long]
    sys.stdout.flush()
    for line in over:
        print(line, file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
