"""The CLI's one exit-code map (0 ok, 1 runtime failure, 2 bad input, 130 interrupted), and library messages
that leave the CLI's flags to the CLI."""

from __future__ import annotations

import ast
import importlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest

import lorakit
from lorakit import cli
from lorakit.cli.common import BadInput

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

TESTS = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_ctrl_c_mid_training_exits_130(tmp_path: Path) -> None:
    """SIGINT (what Ctrl-C sends) to a real `lorakit finetune`, held still right after its first logged step."""
    sys.path.insert(0, str(TESTS))
    import _cli_hold
    import _hf_models

    model_dir = _hf_models.save_tiny("gpt2", tmp_path / "gpt2")
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps({"text": s}) + "\n" for s in _hf_models.SENTENCES * 2))
    marker = "step epoch=1/"
    flags = ["--model", model_dir, "--data", rows, "--task", "causal-lm", "--out", tmp_path / "out", "--epochs", "2"]
    flags += ["--batch-size", "2", "--log-every", "1", "--device", "cpu", "--plain"]
    held = _cli_hold.signal_at(marker, ["finetune", *flags], signal.SIGINT, ENV)  # it got as far as training
    assert held.returncode == 130, (held.returncode, held.err)
    assert held.err.strip().splitlines()[-1] == "lorakit finetune: interrupted" and "Traceback" not in held.err
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


# command: (module of its handler, its arguments)
COMMANDS = {
    "example": ("example", []),
    "bench": ("bench", []),
    "inspect": ("inspect", ["x"]),
    "merge": ("merge", ["--model", "m", "--adapter", ".", "--out", "o"]),  # paths the dispatcher's check passes
    "generate": ("generate", ["--model", "m", "--prompt", "p"]),
    "chat": ("chat", ["--model", "m"]),
    "finetune": ("finetune", ["--model", "m", "--data", "d", "--task", "causal-lm", "--out", "o"]),
    "export": ("export", ["--model", "m", "--adapter", ".", "--out", "o"]),
}  # E1: lorakit export (issue 15)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_goes_through_the_one_map(command: str, monkeypatch, capsys) -> None:
    module, args = COMMANDS[command]
    for error, status, says in (
        (KeyboardInterrupt(), 130, "interrupted"),
        (BadInput("no"), 2, "error: no"),
        (FloatingPointError("nan"), 1, "failed: FloatingPointError: nan"),
    ):

        def handler(_args, error=error) -> int:
            raise error

        monkeypatch.setattr(importlib.import_module(f"lorakit.cli.{module}"), command, handler)
        assert cli.main([command, *args]) == status
        assert capsys.readouterr().err == f"lorakit {command}: {says}\n"


def test_the_exit_codes_are_one_map() -> None:
    assert (cli.EXIT_OK, cli.EXIT_FAILURE, cli.EXIT_BAD_INPUT, cli.EXIT_INTERRUPTED) == (0, 1, 2, 130)
    sources = {p.name: p.read_text() for p in (Path(cli.__file__).parent).glob("*.py")}
    for name, text in sources.items():  # only the dispatcher turns outcomes into statuses
        if name != "__init__.py":
            assert "except KeyboardInterrupt" not in text and "130" not in text, name


def _flags_in_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal but docstrings that names a `--flag`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words = node.value.split()
            if any(w.lstrip("(`'\"").startswith("--") and w.lstrip("(`'\"")[2:3].isalpha() for w in words):
                found.append((node.lineno, node.value))
    return found


# Not messages but advice whose content is commands to type (lorakit's own and other runtimes', e.g. vLLM's
# --max-lora-rank): the portability report's findings
ADVICE = {Path("export/portability.py"), Path("export/portability_experts.py")}  # inspect --target's advice
# Packages at the CLI's level: cli/ words messages in flags, and examples/ drives the CLI as a user does (the chat
# example runs `lorakit serve` and `lorakit export`), so flags are their content
CLI_LEVEL = {"cli", "examples"}


def test_library_messages_name_no_cli_flags() -> None:
    root = Path(lorakit.__file__).parent
    found = {
        f"{p.relative_to(root)}:{line}": text
        for p in sorted(root.rglob("*.py"))
        if not CLI_LEVEL & set(p.relative_to(root).parts) and p.relative_to(root) not in ADVICE
        for line, text in _flags_in_strings(p)
    }
    assert not found, found
    assert _flags_in_strings(root / "cli" / "finetune.py")  # the scan does see flags where they belong


def test_bench_finds_the_benchmarks_of_this_checkout() -> None:
    from lorakit.cli.bench import BENCH_SCRIPT

    assert Path(__file__).resolve().parents[2] / "benchmarks" / "run.py" == BENCH_SCRIPT and BENCH_SCRIPT.is_file()


def test_finetune_input_problems_exit_2(tmp_path: Path, capsys) -> None:
    """Missing or unreadable inputs, named, before anything is written."""
    sys.path.insert(0, str(TESTS))
    import _hf_models

    model_dir = _hf_models.save_tiny("gpt2", tmp_path / "gpt2")
    rows = tmp_path / "t.jsonl"
    rows.write_text("".join(json.dumps({"text": s}) + "\n" for s in _hf_models.SENTENCES))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.toml").write_text("rank = [")
    base = ["finetune", "--model", str(model_dir), "--task", "causal-lm", "--out", str(tmp_path / "o")]
    cases = [
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["--data", str(rows), "--valid", str(tmp_path)], str(tmp_path)),
        (["--data", str(tmp_path / "empty.jsonl")], "empty.jsonl"),
        (["--data", str(rows), "--config", str(tmp_path / "bad.toml")], "bad.toml: not valid TOML"),
        (["--data", str(rows), "--config", str(tmp_path / "none.toml")], "none.toml: no such file"),
    ]
    for extra, says in cases:
        assert cli.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "o").exists()
