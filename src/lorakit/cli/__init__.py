"""The `lorakit` command: one dispatcher, one exit-code map, one short function per subcommand.

    0    ok
    1    a runtime failure (training diverged, a device is missing, a check failed, ...)
    2    bad input: flags, paths, files or data the user passed (argparse's own usage errors too)
    130  interrupted (Ctrl-C)

A subcommand is two functions in a module of its own name (merge.py, ...): `add_<name>(subparsers)` declaring its flags
with `set_defaults(run=<name>)`, and `<name>(args) -> int` building a config and calling the library. It
returns its status or raises: `common.BadInput` for bad input (the library's input errors become BadInput
through `common.inputs`, worded in flags), anything else for a runtime failure. Only `main` maps them.
A subcommand with a `--config FILE` flag reads its flags from a TOML run file too (runfile.py); one that
sets `args.interrupt_hint` (a callable returning a line or None) has that line added to "interrupted".
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import cast

from . import paths, runfile
from .bench import add_bench, bench  # noqa: F401  (bench: lorakit.cli.bench, as before)
from .chat import add_chat
from .common import BadInput, print_notes
from .eval import add_eval
from .example import add_example
from .export import add_export
from .finetune import add_finetune
from .generate import add_generate
from .inspect import add_inspect
from .merge import add_merge
from .parser import CommandParser, Parser
from .predict import add_predict
from .quiet import quiet_third_party
from .serve import add_serve

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    add_example,
    add_finetune,
    add_merge,
    add_inspect,
    add_generate,
    add_chat,
    add_bench,
    add_eval,
    add_predict,
    add_serve,
    add_export,
]


def build_parser() -> argparse.ArgumentParser:
    """The `lorakit` argument parser with every subcommand in SUBCOMMANDS."""
    from .. import __version__

    parser = Parser(
        prog="lorakit",
        description="LoRA for PyTorch: train, save, load and merge low-rank adapters. Start with `lorakit example`.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    # each subcommand's parser is a CommandParser (its own usage and "did you mean" on an unknown flag)
    sub = parser.add_subparsers(metavar="COMMAND", title="commands", dest="command", parser_class=CommandParser)
    for add in SUBCOMMANDS:
        add(cast("argparse._SubParsersAction[argparse.ArgumentParser]", sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lorakit` console script and `python -m lorakit`; returns the exit status."""
    quiet_third_party()  # for every command: no third-party chatter (torchao's, transformers') on the way
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        runfile.pre_parse(parser, argv)  # `--config FILE`: the file's values become the subcommand's defaults
    except BadInput as e:
        command = next((a for a in argv if not a.startswith("-")), "")
        print(f"lorakit {command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    args = parser.parse_args(argv)  # a usage error exits 2 here, with argparse's message
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    name = f"lorakit {args.command}"
    print_notes()  # the library's provenance notes as `note:` lines
    try:
        paths.check_paths(args, paths.subcommand(parser, args.command))  # before any command loads a model
        return args.run(args) or EXIT_OK
    except BadInput as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        hint = getattr(args, "interrupt_hint", None)  # a subcommand may say how to go on (finetune: --resume)
        said = hint() if callable(hint) else None
        print(f"{name}: interrupted" + (f"; {said}" if said else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a runtime failure: say what, not a traceback
        print(f"{name}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
