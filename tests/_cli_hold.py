"""Run the lorakit CLI, holding still for good once stdout has carried a line that starts with PREFIX.

Usage: python _cli_hold.py PREFIX LORAKIT_ARGS...

A test reads the child's stdout until PREFIX's line, then signals it (SIGINT, SIGKILL): the child is then
known to be blocked right after that line, so the signal always lands mid-run, never after a fast child
has already finished. Everything else is the real `lorakit` entry point (`lorakit.cli.main`).
"""

from __future__ import annotations

import signal
import sys
from typing import TextIO

from lorakit.cli import main


class HoldingStdout:
    """A stdout that writes through, and after a line starting with `prefix` waits for a signal forever."""

    def __init__(self, stream: TextIO, prefix: str) -> None:
        self.stream, self.prefix, self.pending = stream, prefix, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        *lines, self.pending = (self.pending + text).split("\n")
        if any(line.startswith(self.prefix) for line in lines):
            self.stream.flush()
            while True:  # only a signal ends this: SIGINT raises KeyboardInterrupt here, SIGKILL ends the process
                signal.pause()
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


if __name__ == "__main__":
    # a shell without job control starts background commands with SIGINT ignored, and children inherit that;
    # the tests stand for a Ctrl-C at a terminal, where Python's own handler (KeyboardInterrupt) is in place
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdout = HoldingStdout(sys.stdout, sys.argv[1])
    sys.exit(main(sys.argv[2:]))
