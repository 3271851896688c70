"""The paths a command line names, checked before any command loads a model: adapter directories and --out.

    lorakit eval --model M --adapter adapters/typo --data rows.jsonl
    lorakit eval: error: --adapter adapters/typo: no such directory        (at once, not after loading M)

A data file is checked where the data is read (finetune checks it right after the model's config, before the
tokenizer and weights load); `--model` is each command's own (a directory or a name it resolves).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import BadInput

OUT_DIR_METAVAR = "DIR"  # an --out that names a directory (bench's --out names a report file)


def check_paths(args: argparse.Namespace, command: argparse.ArgumentParser | None) -> None:
    """BadInput naming the first --adapter that is no directory, or an --out that cannot be written."""
    if command is None:
        return
    flags = {o: a for a in command._actions for o in a.option_strings}
    for name, value in _adapter_values(args) if "--adapter" in flags else []:  # (inspect's ADAPTER may be a file)
        if not Path(value).is_dir():
            raise BadInput(f"--adapter {value}: no such directory{_named(name)}")
    if "--out" in flags and getattr(args, "out", None) is not None:
        check_out(Path(args.out), directory=flags["--out"].metavar == OUT_DIR_METAVAR)


def _adapter_values(args: argparse.Namespace) -> list[tuple[str | None, str]]:
    """(name or None, directory) of each --adapter (one, or repeated as [NAME=]DIR)."""
    given = getattr(args, "adapter", None)
    values = [given] if isinstance(given, str) else list(given or [])
    dirs: list[tuple[str | None, str]] = []
    for value in map(str, values):
        name, sep, d = value.partition("=")
        dirs.append((name, d) if sep and not Path(value).exists() else (None, value))  # NAME=DIR, unless a path
    return dirs


def _named(name: str | None) -> str:
    """Which adapter a message is about, when the command line named it."""
    return f" (adapter {name!r})" if name else ""


def check_out(out: Path, directory: bool = True) -> None:
    """BadInput unless `out` can be created or written: the nearest existing folder on its way must be a
    writable directory, and `out` itself (with `directory`) no file."""
    if directory and out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: is a file; expected a directory (new, or one to write into)")
    parent = out if out.is_dir() else out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BadInput(f"--out {out}: {parent} is a file, so nothing can be created under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"--out {out}: cannot write in {parent} (permission denied)")


def subcommand(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser | None:
    """The parser of subcommand `name`, or None."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    return None
