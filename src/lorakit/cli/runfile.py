"""Run files: a subcommand's flags as a TOML file (`--config run.toml`), and the resolved flags written back.

    lorakit finetune --config run.toml --lr 1e-3      # the file's values, --lr from the command line

Every flag of a subcommand that has `--config` is a key, named by its argparse dest (`max_length`, or
`max-length` as on the command line); tables only group keys (`[lora] rank = 8` is `rank = 8`). The
order is argparse default < file < command line. A value is checked as the flag's own type would check
it, and a path (a flag whose metavar is DIR or FILE, or a --model that is not a hub id) is taken relative to the
file's directory. Nothing here knows finetune's flags: a flag added to the parser is a key at once.

`write` records every flag's resolved value (paths absolute) so `--config OUT/run/run.toml --out NEW`
repeats a run exactly. tomllib only reads TOML; the file holds flat scalars and lists, so a few lines
below write it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files.atomic import atomic_write
from .common import MODEL_METAVAR, BadInput

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

PATH_METAVARS = ("DIR", "FILE", "FILE|DIR")  # flags that take a path: relative to the run file, recorded absolute
NOT_FLAGS = ("help", "config")  # --help; --config itself is not a key of the file it names


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's flags by dest, without --help and --config."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_FLAGS}


def read(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The run file's values by dest, each checked against its flag; BadInput naming the file and key."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise BadInput(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot read it ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{path}: not valid TOML ({e})") from None
    actions = flag_actions(parser)
    values: dict[str, Any] = {}
    for key, value in _flat(doc):
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None:
            raise BadInput(f"{path}: unknown key {key!r}; the keys are the flags of this command: {', '.join(actions)}")
        if dest in values:
            raise BadInput(f"{path}: key {key!r} is given twice")
        values[dest] = _checked(path, key, value, action)
    return values


def _flat(doc: Mapping[str, Any], where: str = "") -> Iterable[tuple[str, Any]]:
    """(key, value) pairs with tables opened (a table only groups keys)."""
    for key, value in doc.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{where}{key}.")
        else:
            yield key, value


def _checked(path: Path, key: str, value: Any, action: argparse.Action) -> Any:
    """`value` as the flag would take it from the command line, or BadInput saying what was expected."""
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise BadInput(f"{path}: {key} = {_toml(value)} is invalid: expected true or false")
        return value
    many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
    if many:
        if not isinstance(value, list):
            raise BadInput(f"{path}: {key} = {_toml(value)} is invalid: expected a list, e.g. [{_example(action)}]")
        return [_one(path, key, v, action) for v in value]
    return _one(path, key, value, action)


def _one(path: Path, key: str, value: Any, action: argparse.Action) -> Any:
    """One value through the flag's type and choices; a path taken relative to the run file."""
    convert = action.type if callable(action.type) else str
    name = getattr(convert, "__name__", "value")
    expected = {"int": "an integer", "float": "a number", "str": "a string"}.get(name, f"a {name.replace('_', ' ')}")
    if isinstance(value, (bool, list, dict)) or (convert is str and not isinstance(value, str)):
        raise BadInput(f"{path}: {key} = {_toml(value)} is invalid: expected {expected}")
    if isinstance(value, float) and convert is not float:
        raise BadInput(f"{path}: {key} = {_toml(value)} is invalid: expected {expected}")
    try:
        out = convert(value if isinstance(value, str) else str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise BadInput(f"{path}: {key} = {_toml(value)} is invalid: expected {expected} ({e})") from None
    if isinstance(value, str) and isinstance(out, (int, float)):  # a number's flag takes a TOML number
        raise BadInput(f"{path}: {key} = {_toml(value)} is invalid: expected {expected}")
    if action.choices is not None and out not in action.choices:
        listed = ", ".join(map(str, action.choices))
        raise BadInput(f"{path}: {key} = {_toml(value)} is invalid: expected one of {listed}")
    local_model = action.metavar == MODEL_METAVAR and isinstance(out, str) and _is_local_model(out, path.parent)
    if (action.metavar in PATH_METAVARS or local_model) and isinstance(out, str):
        out = str(path.parent / out) if not Path(out).is_absolute() else out
    return out


def _is_local_model(value: str, base: Path) -> bool:
    """Whether a --model value is a path (relative to `base`), not a hub id: an existing path wins, as in
    hf.hub.resolve_model, and ORG/NAME that is not one is a hub id, kept as given."""
    from ..hf.hub import is_hub_id

    return (base / value).exists() or not is_hub_id(value)


def _example(action: argparse.Action) -> str:
    """A sample list item for an error message."""
    return '"q_proj", "v_proj"' if action.type in (None, str) else "1, 2"


def use_as_defaults(parser: argparse.ArgumentParser, values: Mapping[str, Any]) -> None:
    """Make the run file's values the flags' defaults (a required flag the file gives is then optional)."""
    actions = flag_actions(parser)
    for dest, value in values.items():
        actions[dest].required = False
        actions[dest].default = value


def pre_parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """If argv's subcommand takes --config and names a file (or implies one, its `recorded_run` default), load
    it as that subcommand's defaults."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None:
        return
    command = next((a for a in argv if not a.startswith("-")), None)
    subparser = sub.choices.get(command) if command else None
    if subparser is None or "config" not in {a.dest for a in subparser._actions}:
        return
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(list(argv))
    path = known.config
    if path is None:  # a subcommand may name a run file the command line implies (finetune --out OUT --resume)
        implied = subparser.get_default("recorded_run")
        path = implied(argv) if callable(implied) else None
    if path:
        use_as_defaults(subparser, read(path, subparser))


# -- writing: tomllib only reads, and a run file is flat scalars and lists --------------------------------


def resolved(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Every flag's value in `args` by dest, paths made absolute."""
    values: dict[str, Any] = {}
    for dest, action in flag_actions(parser).items():
        value = getattr(args, dest, None)
        local_model = action.metavar == MODEL_METAVAR and isinstance(value, str) and _is_local_model(value, Path())
        if (action.metavar in PATH_METAVARS or local_model) and isinstance(value, str):
            value = str(Path(value).resolve())
        values[dest] = value
    return values


def write(
    path: str | Path, args: argparse.Namespace, parser: argparse.ArgumentParser, skip: Sequence[str] = ()
) -> Path:
    """Record every flag's resolved value in `path` (atomically); paths absolute, None (unset) left out."""
    lines = [
        f"# lorakit {parser.prog.split()[-1]}: every flag of this run, resolved. Repeat the run with",
        f"#   {parser.prog} --config THIS_FILE --out NEW_DIR",
    ]
    lines += [f"{k} = {_toml(v)}" for k, v in resolved(args, parser).items() if k not in skip and v is not None]
    atomic_write(path, ("\n".join(lines) + "\n").encode())
    return Path(path)


def _toml(value: Any) -> str:
    """A TOML literal of a bool, int, float, string or a list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if value != value else ("inf" if value > 0 else "-inf"))
    if isinstance(value, str):  # a JSON string is a TOML basic string (same escapes; DEL must be escaped too)
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))
