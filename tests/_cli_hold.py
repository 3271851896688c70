"""Run the lorakit CLI, holding still for good once stdout has carried a line that starts with PREFIX.

Usage: python _cli_hold.py PREFIX LORAKIT_ARGS...

A test reads the child's stdout until PREFIX's line, then signals it (SIGINT, SIGKILL): the child is then
known to be blocked right after that line, so the signal always lands mid-run, never after a fast child
has already finished. Everything else is the real `lorakit` entry point (`lorakit.cli.main`). `signal_at` is
that test's side, one helper for every test that signals a run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
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


@dataclass
class Signalled:
    """What a child signalled by `signal_at` printed, and how it ended."""

    seen: list[str]  # its stdout lines up to the marker's, which is the last
    rest: str  # its stdout after the marker's line (nothing, when it held where it should)
    err: str
    returncode: int


def signal_at(marker: str, argv: list, sig: int, env: dict[str, str]) -> Signalled:
    """`lorakit ARGV` in a child held still after its stdout line starting with `marker`, sent `sig` there.

    Fails (AssertionError) if the child's stdout ends without that line.
    """
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__)), marker, *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(marker):
            proc.send_signal(sig)
            break
    rest, err = proc.communicate(timeout=60)
    assert seen and seen[-1].startswith(marker), "".join(seen) + rest + err  # it got as far as the marker
    return Signalled(seen, rest, err, proc.returncode)


if __name__ == "__main__":
    # a shell without job control starts background commands with SIGINT ignored, and children inherit that;
    # the tests stand for a Ctrl-C at a terminal, where Python's own handler (KeyboardInterrupt) is in place
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdout = HoldingStdout(sys.stdout, sys.argv[1])
    sys.exit(main(sys.argv[2:]))
