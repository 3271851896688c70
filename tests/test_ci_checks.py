"""The checks `.ci/run` makes with scripts/: the line budget and the API docstrings fail on what they should."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import line_budget  # noqa: E402  (scripts/ is not a package)


def test_line_budget_allows_400_lines_and_names_a_401_line_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "ok.py").write_text("x = 1\n" * 400)
    assert line_budget.main([str(tmp_path)]) == 0
    (tmp_path / "pkg" / "big.py").write_text("x = 1\n" * 401)
    assert line_budget.main([str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "401" in out and "big.py" in out  # the largest files are printed every run
    assert f"{tmp_path / 'pkg' / 'big.py'}: 401 lines, over the budget of 400" in err and "ok.py" not in err


def _function(name: str, lines: int, indent: str = "") -> str:
    """A function of exactly `lines` lines (def line to last line)."""
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 2))
    return f"{indent}def {name}():\n{body}{indent}    return 0\n"


def test_function_budget_allows_60_lines_and_names_a_61_line_function_or_method(tmp_path: Path, capsys) -> None:
    (tmp_path / "pkg").mkdir()
    module = tmp_path / "pkg" / "mod.py"
    head = _function("short", 60) + "\n\nclass Thing:\n"  # the method's def is line 64
    module.write_text(head + _function("fine", 3, "    "))
    args = [str(tmp_path), "--functions", str(tmp_path), "--max-function-lines", "60"]
    assert line_budget.main(args) == 0
    module.write_text(head + _function("long", 61, "    "))
    assert line_budget.main(args) == 1
    err = capsys.readouterr().err
    assert f"{module}:64: Thing.long is 61 lines, over the limit of 60" in err
    assert "short" not in err


def test_function_budget_is_read_from_pyproject_and_src_is_checked(tmp_path: Path) -> None:
    assert line_budget.max_function_lines() == 60  # pyproject.toml [tool.lorakit]: the rule, stated once
    (tmp_path / "m.py").write_text(_function("f", 61))
    assert line_budget.main([str(tmp_path), "--functions", str(tmp_path)]) == 1
    assert line_budget.main([str(tmp_path)]) == 0  # the file budget alone: a long function is not checked
    ci = (ROOT / ".ci" / "run").read_text()
    assert "line_budget.py src tests benchmarks --budget 400 --functions src" in ci


MODULE = '''"""A module."""

__all__ = ["documented", "Thing"]


def documented(x):
    """Double x.

    Examples:
        >>> documented(2)
        4
    """
    return 2 * x


def undocumented_but_private():
    return 0


class Thing:
    """A thing."""

    def method(self):
        BODY
'''


@pytest.mark.parametrize(
    "body, problem",
    [
        ('"""Fine."""', None),
        ("return 1", "pkg.mod.Thing.method: public, but has no docstring"),
        (
            '"""Run it.\n\n        Example:\n            >>> Thing().method()\n        """',
            "outside an `Examples:` section",
        ),
        ('"""Run it.\n\n        Args:\n            nope: no such parameter.\n        """', "'nope' does not appear"),
    ],
)
def test_docstring_check(tmp_path: Path, body: str, problem: str | None) -> None:
    pytest.importorskip("griffe")
    import check_docstrings

    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "__init__.py").write_text('"""A package."""\n')
    (tmp_path / "src" / "pkg" / "mod.py").write_text(MODULE.replace("BODY", body))
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "mod.md").write_text("# mod\n\n::: pkg.mod\n")
    assert check_docstrings.documented_modules(tmp_path / "api") == ["pkg.mod"]
    found = check_docstrings.problems(["pkg.mod"], tmp_path / "src")
    if problem is None:
        assert found == []
    else:
        assert found and any(problem in line for line in found), found
