"""lorakit's modules import one way: the graph of imports between them (any import statement, at the top
of a file or inside a function) has no cycle, and files/ never reaches model code."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import lorakit

ROOT = Path(lorakit.__file__).parent
# what files/ must never import, directly or through another lorakit module
MODEL_CODE = (
    "lorakit.layers",
    "lorakit.model",
    "lorakit.adapters",
    "lorakit.loading",
    "lorakit.saving",
    "lorakit.variants",
    "lorakit.train",
    "lorakit.hf",
    "lorakit.serve",
    "lorakit.export",
    "lorakit.align",
    "lorakit.cli",
    "lorakit.examples",
)
# the packages late in the data flow (core -> files -> variants -> train -> hf -> serve, export -> align -> cli), each
# with the packages allowed to import it
LATE = {
    # examples/ sits beside cli/ at the top (docs/architecture.md): the LLM example runs hf's jobs and the
    # export's vocabulary; it reaches the server only as a `lorakit serve` subprocess
    "lorakit.hf": ("lorakit.hf", "lorakit.serve", "lorakit.export", "lorakit.align", "lorakit.cli", "lorakit.examples"),
    # align/ runs the serving engine for rollouts, in process
    "lorakit.serve": ("lorakit.serve", "lorakit.align", "lorakit.cli"),
    "lorakit.align": ("lorakit.align", "lorakit.cli", "lorakit.examples"),
    "lorakit.export": ("lorakit.export", "lorakit.cli", "lorakit.examples"),
    "lorakit.cli": ("lorakit.cli",),
}


def _modules() -> dict[str, Path]:
    """{dotted name: file} of every lorakit module (a package is its __init__.py)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("lorakit", *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def imports_of(name: str, path: Path) -> set[str]:
    """The lorakit modules that module `name` (at `path`) imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from pkg import mod` needs pkg.mod; `from pkg import name` needs pkg
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source)
    return {m for m in found if m in MODULES and m != name}


def import_graph() -> dict[str, set[str]]:
    return {name: imports_of(name, path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_the_graph_sees_relative_and_function_level_imports() -> None:
    graph = import_graph()
    assert "lorakit.train.events" in graph["lorakit.train.trainer"]  # from .events import ...
    assert "lorakit.train.dashboard" in graph["lorakit.train.reporting"]  # inside auto_reporter()
    assert "lorakit.model" in graph["lorakit"]  # a package's __init__
    assert "lorakit.files.peft_format" in graph["lorakit.files.inspect"]  # from . import peft_format
    assert "lorakit.files" not in graph["lorakit.files.inspect"]  # ... which needs no name of files/__init__


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_files_never_reaches_model_code() -> None:
    graph = import_graph()
    for start in (m for m in MODULES if m.startswith("lorakit.files")):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        bad = sorted(m for m in seen if any(m == p or m.startswith(p + ".") for p in MODEL_CODE))
        assert not bad, f"{start} imports model code: {bad}"


def test_late_packages_are_imported_only_from_later_ones() -> None:
    graph = import_graph()
    wrong = sorted(
        f"{src} imports {dst}"
        for src, dsts in graph.items()
        for dst in dsts
        for pkg, allowed in LATE.items()
        if (dst == pkg or dst.startswith(pkg + "."))
        and src != "lorakit.__main__"
        and not any(src == a or src.startswith(a + ".") for a in allowed)
    )
    assert not wrong, wrong


def test_ui_is_a_leaf_and_serving_and_export_do_not_need_training() -> None:
    graph = import_graph()
    ui_out = sorted(
        f"{s} imports {d}"
        for s, ds in graph.items()
        if s.startswith("lorakit.ui")
        for d in ds
        if not d.startswith("lorakit.ui")
    )
    assert not ui_out, ui_out
    to_train = sorted(
        f"{s} imports {d}"
        for s, ds in graph.items()
        if s.startswith(("lorakit.serve", "lorakit.export"))
        for d in ds
        if d == "lorakit.train" or d.startswith("lorakit.train.")
    )
    assert not to_train, to_train


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"lorakit.__main__"}))  # __main__ runs the CLI
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements a module runs when imported: its body, into if/for/with/try blocks, not into defs."""
    out = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        out.append(node)
        for field in ("body", "orelse", "finalbody", "handlers"):
            out += _top_level(getattr(node, field, []))
    return out


def test_importing_a_module_fills_no_other_modules_table() -> None:
    """Registration is an explicit call (`lorakit.variants.register`), never a side effect of an import: no module
    writes into a name it imported (`LORA_LAYERS[...] = ...`) while it is being imported."""
    wrong = []
    for name, path in MODULES.items():
        body = _top_level(ast.parse(path.read_text(encoding="utf-8")).body)
        imported = {
            (a.asname or a.name).split(".")[0]
            for n in body
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in n.names
        }
        for node in body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for t in targets:
                while isinstance(t, (ast.Subscript, ast.Attribute)):
                    t = t.value
                    if isinstance(t, ast.Name) and t.id in imported:
                        wrong.append(f"{name}:{node.lineno} writes into {t.id}")
    assert not wrong, wrong
