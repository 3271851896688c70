"""The CLI's layout: one module per command, and library errors whose remedy is a parameter worded in flags."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

import lorakit
from lorakit import cli
from lorakit.cli.common import PARAM_FLAGS, REMEDIES, flag_words
from lorakit.errors import LoraBaseMismatch, LoraError


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_each_command_is_a_module_of_its_name() -> None:
    for name, sub in _subparsers().items():
        assert sub.get_default("run").__module__ == f"lorakit.cli.{name}", name


def test_cli_modules_import_no_private_names_from_each_other() -> None:
    for path in Path(cli.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .module import ...
                assert not [a.name for a in node.names if a.name.startswith("_")], (path.name, node.module)


def _sets_param(func: ast.expr) -> bool:
    """A call that sets a library error's `param`: `super().__init__(...)`, or a LoraError class called by name
    (not serve's request errors, whose `param` names a field of the HTTP request)."""
    name = getattr(func, "attr", None) or getattr(func, "id", None) or ""
    return name == "__init__" or (name.startswith("Lora") and name.endswith("Error"))


def _library_params() -> set[str]:
    """Every `param` the library's errors set: `param = "..."` in a class body, `param=` in `super().__init__` or in
    a call of an error class (`LoraTargetError(..., param="targets")`)."""
    found: set[str] = set()
    root = Path(lorakit.__file__).parent
    for path in root.rglob("*.py"):
        if "cli" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            values: list[ast.expr] = []
            if isinstance(node, ast.ClassDef):
                values = [
                    a.value
                    for a in node.body
                    if isinstance(a, ast.Assign) and [getattr(t, "id", None) for t in a.targets] == ["param"]
                ]
            elif isinstance(node, ast.Call) and _sets_param(node.func):
                values = [k.value for k in node.keywords if k.arg == "param"]
            found |= {c.value for v in values for c in ast.walk(v) if isinstance(c, ast.Constant) and c.value}
    return found


def test_every_library_param_maps_to_a_flag_the_parser_has() -> None:
    params = _library_params()
    assert {"allow_base_mismatch", "skip_bad_rows", "trust_remote_code"} <= params  # the scan sees them
    assert params == set(PARAM_FLAGS) == set(REMEDIES)
    flags = {o for sub in _subparsers().values() for a in sub._actions for o in a.option_strings}
    for param, flag in PARAM_FLAGS.items():
        assert flag in flags, (param, flag)


def test_a_base_mismatch_names_its_param_and_the_cli_words_it_as_a_flag() -> None:
    e = LoraBaseMismatch("adapters/x: this adapter was saved for a different base: 0.weight differs", ["0.weight"])
    assert e.param == "allow_base_mismatch" and "pass allow_base_mismatch=True" in str(e)
    assert flag_words(e) == (
        "adapters/x: this adapter was saved for a different base: 0.weight differs; load it onto the base it was "
        "trained on, or pass --allow-base-mismatch to load it anyway"
    )
    assert LoraError("plain").param is None and flag_words(LoraError("plain")) == "plain"


def test_a_real_provenance_refusal_carries_its_param(tmp_path: Path) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = lorakit.apply_lora(nn.Sequential(nn.Linear(4, 8)), lorakit.LoraConfig(rank=2), ["0"])
    saved = lorakit.save_adapters(model, tmp_path / "adapter")
    other = nn.Sequential(nn.Linear(4, 8))  # another base of the same shapes
    with pytest.raises(LoraBaseMismatch) as e:
        lorakit.load_adapters(other, saved)
    assert e.value.param == "allow_base_mismatch"
    assert "--allow-base-mismatch" in flag_words(e.value) and "--" not in str(e.value)
