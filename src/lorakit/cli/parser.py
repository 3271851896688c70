"""The `lorakit` argument parsers: argparse's, with "did you mean" for typed names and each subcommand's own usage.

    lorakit finetun ...            -> argument COMMAND: invalid choice: 'finetun' (...); did you mean 'finetune'?
    lorakit finetune --max-lenght  -> usage: lorakit finetune ...
                                      ... unrecognized arguments: --max-lenght; did you mean --max-length?

argparse hands a subcommand's unknown flags up to the top-level parser, which reports them under the top-level
usage; `CommandParser` refuses them itself, so the usage shown is the subcommand's. Suggestions come from
difflib over the parser's own choices and option strings, so they cannot name a flag that does not exist.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

CUTOFF = 0.6  # difflib's similarity ratio a suggestion needs (its default)


def closest(word: str, names: Iterable[str]) -> str | None:
    """The name most like `word`, or None when none is close.

    Examples:
        >>> closest("finetun", ["finetune", "merge", "eval"])
        'finetune'
        >>> closest("zzz", ["finetune"]) is None
        True
    """
    found = difflib.get_close_matches(word, list(names), n=1, cutoff=CUTOFF)
    return found[0] if found else None


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose invalid choices (a command, --task, ...) suggest the closest valid one."""

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """argparse's check of a value against `action.choices`, with a suggestion added to its error."""
        if action.choices is None or value in action.choices:
            return
        listed = ", ".join(map(repr, action.choices))
        guess = closest(value, map(str, action.choices)) if isinstance(value, str) else None
        hint = f"; did you mean {guess!r}?" if guess else ""
        raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {listed}){hint}")


class CommandParser(Parser):
    """A subcommand's parser: an unknown flag is its own usage error, with the closest flag it has."""

    def parse_known_args(  # type: ignore[override]  # argparse's overloads; lorakit calls it one way
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Parse `args`; anything left over is an error under this subcommand's usage."""
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.unrecognized(extras)
        return parsed, extras

    def unrecognized(self, extras: Sequence[str]) -> NoReturn:
        """Exit 2 naming the arguments this subcommand does not take, with the closest flag for each typo."""
        options = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        flags = [e.split("=", 1)[0] for e in extras if e.startswith("-")]
        guesses = [(flag, guess) for flag in flags if (guess := closest(flag, options))]
        named = [guess if len(guesses) == 1 else f"{guess} (for {flag})" for flag, guess in guesses]
        hint = f"; did you mean {', '.join(named)}?" if named else ""
        self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
