"""`lorakit serve`'s bad input: exit 2 with a message naming the flag, before anything listens."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _serving  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set


def _serve(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorakit", "serve", "--port", "0", *map(str, args)],
        capture_output=True,
        text=True,
        env={**_serving.ENV, **(env or {})},
        timeout=120,
    )


def test_bad_flags_exit_2_naming_them(tmp_path):
    model = _serving.tiny_chat_llama(tmp_path / "llama")
    r = _serve("--model", tmp_path / "nope")
    assert r.returncode == 2 and "nope" in r.stderr and not r.stdout
    r = _serve("--model", model, "--adapter", f"x={tmp_path / 'missing'}")
    assert r.returncode == 2 and "adapter 'x'" in r.stderr and "missing" in r.stderr and not r.stdout
    r = _serve("--model", model, "--adapter-root", tmp_path / "no-root")
    assert r.returncode == 2 and "--adapter-root" in r.stderr
    r = _serve("--model", model, "--max-batch", "0")
    assert r.returncode == 2 and "--max-batch" in r.stderr


def test_an_empty_or_missing_key_is_a_start_up_error(tmp_path):
    model = _serving.tiny_chat_llama(tmp_path / "llama")
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    r = _serve("--model", model, "--api-key-file", empty)
    assert r.returncode == 2 and "--api-key-file" in r.stderr and "empty" in r.stderr and not r.stdout
    r = _serve("--model", model, "--api-key-file", tmp_path / "missing.key")
    assert r.returncode == 2 and "missing.key" in r.stderr and not r.stdout
    r = _serve("--model", model, env={"LORAKIT_API_KEY": " "})
    assert r.returncode == 2 and "LORAKIT_API_KEY" in r.stderr and not r.stdout


def test_key_precedence():
    import argparse

    from lorakit.cli.common import BadInput
    from lorakit.cli.serve import api_key

    def args(key=None, key_file=None):
        return argparse.Namespace(api_key=key, api_key_file=key_file)

    env = {"LORAKIT_API_KEY": "from-env"}
    assert api_key(args(), env) == "from-env" and api_key(args(), {}) is None
    assert api_key(args(key="from-flag"), env) == "from-flag"
    with pytest.raises(BadInput, match="both"):
        api_key(args(key="k", key_file="f"), env)


def test_a_key_file_guards_the_server_and_no_access_log_is_quiet(tmp_path):
    import httpx

    model = _serving.tiny_chat_llama(tmp_path / "llama")
    keyfile = tmp_path / "server.key"
    keyfile.write_text("s3cret\n")
    server = _serving.Server("--model", model, "--api-key-file", keyfile, "--no-access-log")
    try:
        assert "s3cret" not in " ".join(server.proc.args)
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        assert server.stop() == 0, "".join(server.stderr)
    rest = []
    while (line := server.lines.get(timeout=60)) is not None:
        rest.append(line)
    assert rest == [], rest  # no access lines: nothing after "ready on"
