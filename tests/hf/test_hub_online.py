"""Online, `resolve_model` fetches a hub id through huggingface_hub's real download path: a hub on 127.0.0.1 (the
test's own HTTP server, HF_ENDPOINT) serves a tiny model's files; a subprocess resolves ORG/NAME into an empty
cache, and only the files a model needs are fetched."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

pytestmark = pytest.mark.slow  # a subprocess and a server

REPO, COMMIT = "acme/tiny-online", "5" * 40
EXTRA = {"README.md": b"# not a model file\n", "original/consolidated.safetensors": b"not fetched"}


class Hub(BaseHTTPRequestHandler):
    """The few routes huggingface_hub's snapshot_download asks: revision info, the file tree, each file."""

    files: dict[str, bytes] = {}
    fetched: list[str] = []

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        path = self.path.split("?")[0]
        info, tree, resolve = f"/api/models/{REPO}/revision/", f"/api/models/{REPO}/tree/", f"/{REPO}/resolve/"
        if path.startswith(info):
            data = json.dumps({"id": REPO, "sha": COMMIT, "siblings": [{"rfilename": f} for f in self.files]})
            return self._send(data.encode(), "application/json", body)
        if path.startswith(tree):
            entries = [
                {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for f, b in self.files.items()
            ]
            return self._send(json.dumps(entries).encode(), "application/json", body)
        if path.startswith(resolve):
            name = path[len(resolve) :].split("/", 1)[1]
            if name in self.files:
                if body:
                    self.fetched.append(name)
                data = self.files[name]
                return self._send(data, "application/octet-stream", body, etag=hashlib.sha1(data).hexdigest())
        self.send_response(404)
        self.send_header("X-Error-Code", "EntryNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, data: bytes, kind: str, body: bool, etag: str | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Repo-Commit", COMMIT)
        if etag:
            self.send_header("ETag", f'"{etag}"')
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_online_resolution_downloads_the_model_files_only(tmp_path):
    model = _hf_models.save_tiny("llama", tmp_path / "model")
    Hub.files = {f.name: f.read_bytes() for f in model.iterdir()} | EXTRA
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_OFFLINE"))}
    env.update(HF_HOME=str(tmp_path / "home"), HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
    code = f"from lorakit.hf.hub import resolve_model; print(resolve_model({REPO!r}))"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path == tmp_path / "home" / "hub" / "models--acme--tiny-online" / "snapshots" / COMMIT
    assert (path / "model.safetensors").read_bytes() == Hub.files["model.safetensors"]
    assert sorted(Hub.fetched) == sorted(f.name for f in model.iterdir())  # not README.md, not original/
