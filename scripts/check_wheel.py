"""Check a built wheel holds the whole package: every module under src/lorakit, py.typed and the examples.

Usage: python scripts/check_wheel.py dist/lorakit-X-py3-none-any.whl [SRC]

Exits 1 naming each file the wheel lacks (an excluded subpackage, a module outside the package finder's reach).
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

REQUIRED = ["lorakit/py.typed", "lorakit/examples/__init__.py", "lorakit/cli/__init__.py"]


def missing_files(wheel: Path, src: Path) -> list[str]:
    """Paths that should be in the wheel (REQUIRED and every .py under src/lorakit) but are not."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    expected = set(REQUIRED)
    expected |= {p.relative_to(src).as_posix() for p in (src / "lorakit").rglob("*.py") if "__pycache__" not in p.parts}
    return sorted(expected - names)


def main(argv: list[str]) -> int:
    """Print what the wheel holds of lorakit; return 1 if anything expected is missing."""
    wheel = Path(argv[0])
    src = Path(argv[1]) if len(argv) > 1 else Path("src")
    with zipfile.ZipFile(wheel) as z:
        count = sum(1 for n in z.namelist() if n.startswith("lorakit/"))
    print(f"{wheel.name}: {count} files under lorakit/")
    missing = missing_files(wheel, src)
    for name in missing:
        print(f"{wheel.name}: missing {name}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
