"""`lorakit chat` in a real terminal: a pseudo-terminal is the process's controlling terminal, stdin, stdout and
stderr, the test types into it and reads the screen, synchronised on the prompt appearing (never a sleep), every
read under a deadline. The turns are checked against the ChatML written by hand and transformers' own greedy
generation; /reset, /exit and Ctrl-D (end of input) are keys typed, Ctrl-C the signal the terminal sends."""

from __future__ import annotations

import fcntl
import os
import re
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402
from test_cli_chat import chatml, greedy  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

PROMPT = "you> "
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r(?!\n)")  # colours, cursor moves, bare carriage returns
TIMEOUT_S = 120  # for each thing awaited: the model's first load in a busy CI


class Terminal:
    """`lorakit ARGS` on a pseudo-terminal of its own: `type` keys, `expect` text on the screen."""

    def __init__(self, *args: object) -> None:
        main, child = os.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorakit", *map(str, args)],
            stdin=child,
            stdout=child,
            stderr=child,
            env={**os.environ, "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"},
            start_new_session=True,  # a session of its own, whose controlling terminal is the pty: Ctrl-C is SIGINT
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(child)
        self.fd, self.raw, self.seen = main, b"", 0

    @property
    def screen(self) -> str:
        """Everything written so far, escapes dropped, line ends as "\\n"."""
        return ESCAPES.sub("", self.raw.decode("utf-8", "replace").replace("\r\n", "\n"))

    def _read(self, deadline: float) -> bool:
        """Read what is there (waiting until `deadline`); False at the end of output."""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"nothing more within {TIMEOUT_S} s; the screen:\n{self.screen}")
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: every process holding the terminal has exited
            chunk = b""
        self.raw += chunk
        return bool(chunk)

    def expect(self, text: str) -> str:
        """Wait until `text` appears after what the previous `expect` matched; returns the screen in between."""
        deadline = time.monotonic() + TIMEOUT_S
        while (at := self.screen.find(text, self.seen)) < 0:
            if not self._read(deadline):
                raise AssertionError(f"{text!r} never appeared; the screen:\n{self.screen}")
        before, self.seen = self.screen[self.seen : at], at + len(text)
        return before

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait(self) -> int:
        """Read to the end of output, then the exit status."""
        deadline = time.monotonic() + TIMEOUT_S
        while self._read(deadline):
            pass
        os.close(self.fd)
        return self.proc.wait(timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _hf_models.save_tiny("gpt2", tmp_path_factory.mktemp("chat") / "gpt2", chat_template=_hf_models.CHATML)


def turn(term: Terminal, message: str) -> tuple[str, str]:
    """Type a message; (the prompt the model was given, as echoed, and the reply), once the next prompt shows."""
    term.type(message + "\n")
    shown = term.expect(PROMPT)
    typed, _, rest = shown.partition("\n")  # the terminal echoes the typed line
    assert typed == message, shown
    at = rest.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    return rest[:at], rest[at:].removesuffix("\n")


def test_two_turns_keep_the_history_reset_clears_it_and_exit_leaves(model_dir):
    term = Terminal("chat", "--model", model_dir, "--max-new-tokens", 8, "--echo")
    term.expect(PROMPT)
    prompt, first = turn(term, "the cat sat")
    assert prompt == chatml(("user", "the cat sat"))
    assert first and first == greedy(model_dir, prompt, 8)

    prompt, second = turn(term, "hello world")
    assert prompt == chatml(("user", "the cat sat"), ("assistant", first), ("user", "hello world"))
    assert second == greedy(model_dir, prompt, 8)
    alone = greedy(model_dir, chatml(("user", "hello world")), 8)
    assert second != alone  # what the history changed: the model saw the first turn

    term.type("/reset\n")
    assert term.expect(PROMPT) == "/reset\n(conversation cleared)\n"
    assert turn(term, "hello world") == (chatml(("user", "hello world")), alone)

    term.type("/exit\n")
    assert term.wait() == 0
    assert "Traceback" not in term.screen


def test_ctrl_d_leaves_with_status_0_and_ctrl_c_as_every_command_does(model_dir):
    ended = Terminal("chat", "--model", model_dir, "--max-new-tokens", 4)
    stopped = Terminal("chat", "--model", model_dir, "--max-new-tokens", 4)  # both load at once: half the wait
    ended.expect("/exit (or Ctrl-D) leaves\n" + PROMPT)
    ended.type("the cat sat\n")
    reply = ended.expect(PROMPT).partition("\n")[2]
    assert reply == greedy(model_dir, chatml(("user", "the cat sat")), 4) + "\n"
    ended.type("\x04")  # Ctrl-D on an empty line: end of input
    assert ended.wait() == 0

    stopped.expect(PROMPT)
    stopped.type("\x03")  # Ctrl-C: the terminal sends SIGINT
    assert stopped.wait() == 130
    assert stopped.screen.endswith("lorakit chat: interrupted\n") and "Traceback" not in stopped.screen
