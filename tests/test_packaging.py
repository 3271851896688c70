"""Packaging: the version is written once and `lorakit --version` prints it; the wheel ships py.typed and every module.

The real wheel is built, installed into a fresh venv and run by `.ci/run wheel`; these tests pin the pieces.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lorakit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import check_wheel  # noqa: E402  (scripts/ is not a package)

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set


def test_lorakit_version_is_the_package_metadata_version() -> None:
    script = Path(sys.executable).with_name("lorakit")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lorakit"]
    proc = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"lorakit {importlib.metadata.version('lorakit')}"
    assert lorakit.__version__ == importlib.metadata.version("lorakit")


def test_the_version_is_written_in_one_place() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lorakit.__version__"}
    init = (ROOT / "src" / "lorakit" / "__init__.py").read_text()
    assert init.count(f'__version__ = "{lorakit.__version__}"') == 1


def test_py_typed_ships_with_the_package() -> None:
    assert (ROOT / "src" / "lorakit" / "py.typed").is_file()
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["lorakit"]


def _wheel(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name in names:
            z.writestr(name, "")
    return path


@pytest.mark.parametrize("drop", ["lorakit/py.typed", "lorakit/examples/__init__.py", "lorakit/variants/dora.py"])
def test_the_wheel_check_names_what_a_wheel_lacks(tmp_path: Path, drop: str) -> None:
    src = ROOT / "src"
    every = [p.relative_to(src).as_posix() for p in (src / "lorakit").rglob("*.py") if "__pycache__" not in p.parts]
    complete = _wheel(tmp_path / "complete.whl", [*every, "lorakit/py.typed"])
    assert check_wheel.missing_files(complete, src) == []
    partial = _wheel(tmp_path / "partial.whl", [n for n in [*every, "lorakit/py.typed"] if n != drop])
    assert check_wheel.missing_files(partial, src) == [drop]
    assert check_wheel.main([str(partial), str(src)]) == 1
