"""Functions short enough to read at once: none over 60 lines (def to last line) in the CLI, the training
loop, the chart and the examples, and the training loop's steps are methods, not closures."""

from __future__ import annotations

import ast
from pathlib import Path

import lorakit

ROOT = Path(lorakit.__file__).parent
CHECKED = ["cli", "train", "examples", "ui/chart.py", "errors.py"]
LIMIT = 60


def _functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_over_the_limit() -> None:
    files = [p for c in CHECKED for p in ([ROOT / c] if c.endswith(".py") else sorted((ROOT / c).rglob("*.py")))]
    assert len(files) > 20  # the scan sees the packages
    long = {
        f"{p.relative_to(ROOT)}:{f.name}": f.end_lineno - f.lineno + 1  # type: ignore[operator]
        for p in files
        for f in _functions(p)
        if f.end_lineno - f.lineno + 1 > LIMIT
    }  # type: ignore[operator]
    assert not long, long


def test_the_training_loop_has_no_nested_functions() -> None:
    for name in ("trainer.py", "run.py"):
        for f in _functions(ROOT / "train" / name):
            inner = [
                getattr(n, "name", "lambda")
                for n in ast.walk(f)
                if n is not f and isinstance(n, (ast.FunctionDef, ast.Lambda))
            ]
            assert not inner, (name, f.name, inner)
