"""Step 5 of `lorakit example chat`: both adapters served by one `lorakit serve` process, asked through `openai`.

The server is a real subprocess on 127.0.0.1 and a free port (`--port 0`; its "ready on URL" line says which). The
requests of both adapters are sent together, so the engine decodes them in shared steps (a mixed-adapter batch:
each row its own adapter); its /metrics histogram of requests per decode step shows that they were. Each answer
must be the one the adapter generated in process (greedy: the same sampler, the same tokens).
"""

from __future__ import annotations

import functools
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from . import chat_tasks
from .chat_tasks import MAX_NEW_TOKENS, say

if TYPE_CHECKING:
    import openai

ASKED = 8  # held-out prompts asked of each adapter through the server
READY_TIMEOUT_S = 180.0


class ServeProcess:
    """`lorakit serve` in a subprocess: started, its URL read from its ready line, stopped with SIGTERM."""

    def __init__(self, args: Sequence[str]) -> None:
        cmd = [sys.executable, "-m", "lorakit", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        """Queue each stdout line, then None at its end."""
        assert self.proc.stdout is not None  # Popen(stdout=PIPE)
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _read_stderr(self) -> None:
        """Keep stderr (so a full pipe never blocks the server) to show if it fails."""
        assert self.proc.stderr is not None  # Popen(stderr=PIPE)
        self.stderr.extend(self.proc.stderr)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> str:
        """The server's URL, from its "ready on URL" line; RuntimeError (with its stderr) if it ends or stalls."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise RuntimeError(f"no ready line within {timeout:.0f}s: {''.join(self.stderr)[-2000:]}") from None
            if line is None:
                self.proc.wait()
                raise RuntimeError(f"exited {self.proc.returncode} before ready: {''.join(self.stderr)[-2000:]}")
            if "ready on " in line:
                return line.split("ready on ", 1)[1].strip()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the server drains and exits 0), then its exit code; killed if it does not stop in `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _ask(client: openai.OpenAI, start: threading.Barrier, job: tuple[str, str]) -> str:
    """Adapter `job[0]`'s greedy answer to its task on the digits `job[1]`, sent once every request is ready."""
    name, x = job
    start.wait()  # every request leaves together: the engine batches them
    reply = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": chat_tasks.prompt(name, x)}],
        temperature=0.0,
        max_tokens=MAX_NEW_TOKENS,
    )
    return reply.choices[0].message.content or ""


def _ask_all(url: str, adapters: Sequence[str], held_out: Sequence[str]) -> dict[str, list[str]]:
    """Every adapter's first ASKED held-out prompts of its task, sent at once through the openai client."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120.0)
    jobs = [(name, x) for name in adapters for x in held_out[:ASKED]]
    ask = functools.partial(_ask, client, threading.Barrier(len(jobs)))
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    return {name: answers[i * ASKED : (i + 1) * ASKED] for i, name in enumerate(adapters)}


def shared_steps(url: str) -> tuple[int, int]:
    """(decode steps that ran more than one request, all decode steps), from the server's /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("lorakit_batch_size_count") or line.startswith('lorakit_batch_size_bucket{le="1.0"}'):
            key, _, value = line.rpartition(" ")
            values[key.split("{")[0]] = float(value)
    total = int(values.get("lorakit_batch_size_count", 0))
    return total - int(values.get("lorakit_batch_size_bucket", 0)), total


def serve_step(
    base: Path, adapters: dict[str, Path], held_out: Sequence[str], completions: dict[str, dict[str, list[str]]]
) -> bool:
    """Step 5; True when the server answered every request as the adapter does in process, in shared steps."""
    flags = [a for name, path in adapters.items() for a in ("--adapter", f"{name}={path}")]
    say(f"[5/6] serve {' and '.join(adapters)} from one `lorakit serve` (127.0.0.1, a free port); ask through openai")
    server = ServeProcess(["--model", str(base), *flags, "--no-access-log"])
    try:
        url = server.wait_ready()
        answers = _ask_all(url, list(adapters), held_out)
        shared, steps = shared_steps(url)
    except Exception as e:  # the server failed or the client was refused: the step fails, the run goes on
        say(f"      FAILED: {type(e).__name__}: {e}")
        server.stop()
        return False
    code = server.stop()
    say(
        f"      {url}: {sum(map(len, answers.values()))} requests sent together; {shared} of {steps} decode steps "
        "ran several requests (both adapters in one batch)"
    )
    ok = code == 0 and shared > 0
    for name, got in answers.items():
        want = completions[name][name][:ASKED]
        same = [g.strip() == w.strip() for g, w in zip(got, want, strict=True)]
        right = chat_tasks.exact_match(got, name, held_out[:ASKED])
        say(
            f"      '{name}': e.g. {chat_tasks.prompt(name, held_out[0])!r} → {got[0]!r}; {sum(same)}/{len(same)} "
            f"answers as in process, {100 * right:.0f}% right " + ("ok" if all(same) else "FAILED")
        )
        ok = ok and all(same)
    if code != 0 or shared == 0:
        say(f"      FAILED: server exit code {code}, {shared} shared decode steps")
    return ok
