"""Docstrings of the API reference: every public name has one, and its doctests render as code.

Usage: python scripts/check_docstrings.py [DOCS_API_DIR] [SRC]

`mkdocs build --strict` fails on a broken docstring section (an Args entry naming no parameter, ...), but not
on a missing docstring, nor on a doctest outside an `Examples:` section (griffe reads `Example:` as a note
and the `>>>` lines render as nested quotes). This script checks those two, and reports griffe's warnings
on the same docstrings too, so that the pre-commit hook catches broken sections without a docs build.

The modules checked are the `::: module` lines of docs/api/*.md, so the check follows the pages: in each, the
public functions and classes (the names in `__all__`, or else those defined there without a leading `_`) and
the public methods and properties of those classes. A method overriding a documented one (or nn.Module's
forward/extra_repr) inherits its docstring. Exits 1 naming each problem.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import griffe

# nn.Module's hooks: a layer's forward/extra_repr is documented by torch (and by the class docstring).
TORCH_DOCUMENTED = {"forward", "extra_repr"}


def documented_modules(api_dir: Path) -> list[str]:
    """The module paths named by `::: module` lines in the API pages, in page order."""
    found = []
    for page in sorted(api_dir.glob("*.md")):
        found += re.findall(r"^:::\s+([\w.]+)\s*$", page.read_text(), re.M)
    return found


def public_members(obj: griffe.Object) -> list[griffe.Object]:
    """The public functions and classes of a module, or the public methods and properties of a class."""
    out = []
    exports = obj.exports if obj.is_module else None
    for name, member in obj.members.items():
        if name.startswith("_") or (exports is not None and name not in exports):
            continue
        if member.is_alias and exports is None:
            continue  # imported, not exported: documented where it is defined
        target = member.final_target if isinstance(member, griffe.Alias) else member
        if target.is_function or target.is_class or (target.is_attribute and "property" in target.labels):
            out.append(target)
    return out


def inherits_docstring(method: griffe.Object) -> bool:
    """Whether `method` overrides a documented method of a base class (it keeps that contract and its doc)."""
    cls = method.parent
    if not isinstance(cls, griffe.Class):
        return False
    if method.name in TORCH_DOCUMENTED:
        return True
    return any(has_docstring(base.members[method.name]) for base in cls.mro() if method.name in base.members)


def has_docstring(obj: griffe.Object | griffe.Alias) -> bool:
    """Whether obj has a non-blank docstring."""
    return bool(obj.docstring and obj.docstring.value.strip())


def doctest_outside_examples(obj: griffe.Object) -> bool:
    """Whether a `>>>` line sits outside an `Examples:` section (it would render as quoted prose)."""
    if obj.docstring is None:
        return False
    for section in obj.docstring.parse("google"):
        if section.kind is griffe.DocstringSectionKind.examples:
            continue
        text = section.value if isinstance(section.value, str) else getattr(section.value, "contents", "")
        if isinstance(text, str) and any(line.lstrip().startswith(">>>") for line in text.splitlines()):
            return True
    return False


class _Warnings(logging.Handler):
    """Collects griffe's warnings (a broken section, an Args entry naming no parameter, ...) as problems."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def problems(modules: list[str], src: Path) -> list[str]:
    """One line per public object of `modules` (or of their public classes) without a usable docstring."""
    warnings = _Warnings()
    logger = logging.getLogger("griffe")
    logger.addHandler(warnings)
    logger.propagate = False
    try:
        return _problems(modules, src) + warnings.lines
    finally:
        logger.removeHandler(warnings)
        logger.propagate = True


def _problems(modules: list[str], src: Path) -> list[str]:
    """The missing docstrings and misplaced doctests (griffe's own warnings are collected by problems)."""
    loader = griffe.GriffeLoader(search_paths=[str(src)])
    found: list[str] = []
    seen: set[str] = set()
    for path in modules:
        top = loader.load(path.split(".")[0])
        loader.resolve_aliases(external=False, implicit=False)
        named = top.get_member(path.partition(".")[2]) if "." in path else top
        module = named.final_target if isinstance(named, griffe.Alias) else named
        objects = [module]
        for member in public_members(module):
            objects += [member, *(public_members(member) if member.is_class else [])]
        for obj in objects:
            if obj.path in seen:
                continue
            seen.add(obj.path)
            where = f"{obj.relative_filepath}:{obj.lineno or 1}: {obj.path}"
            if not has_docstring(obj) and not inherits_docstring(obj):
                found.append(f"{where}: public, but has no docstring")
            elif doctest_outside_examples(obj):
                found.append(f"{where}: `>>>` lines outside an `Examples:` section (`Example:` is not one)")
    return found


def main(argv: list[str]) -> int:
    """Print how many objects were checked; return 1 naming each problem."""
    api_dir = Path(argv[0]) if argv else Path("docs/api")
    src = Path(argv[1]) if len(argv) > 1 else Path("src")
    modules = documented_modules(api_dir)
    if not modules:
        print(f"{api_dir}: no `::: module` lines found", file=sys.stderr)
        return 1
    found = problems(modules, src)
    print(f"docstrings: {len(modules)} modules named in {api_dir}/, {len(found)} problems", flush=True)
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
