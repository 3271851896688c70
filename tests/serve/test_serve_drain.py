"""`lorakit serve` whose --drain-timeout expires: every request it cuts ends as an OpenAI client expects.

A non-streaming request gets a 503 OpenAI error body; a stream gets a last error event and `data: [DONE]`;
the process still exits 0 (a drain is a normal stop). One server for the module (one request decodes at a time,
so the second waits in the queue when SIGTERM comes).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _serving  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = _serving.tiny_chat_llama(tmp_path_factory.mktemp("drain") / "llama")
    server = _serving.Server("--model", model, "--drain-timeout", "0.5", "--max-batch", "1")
    yield server
    server.stop()


def test_requests_cut_by_the_drain_timeout_end_with_an_openai_error(server):
    http = httpx.Client(base_url=server.url, timeout=60)
    long = {"model": "base", "prompt": "the cat sat", "max_tokens": 1000, "temperature": 0}
    waiting: list = []
    with http.stream("POST", "/v1/completions", json=long | {"stream": True}) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # running, in the only slot
        queued = threading.Thread(target=lambda: waiting.append(http.post("/v1/completions", json=long)))
        queued.start()
        for _ in range(3000):  # until the second request waits in the engine's queue
            if _serving.metric(http.get("/metrics").text, "lorakit_waiting_requests") == 1:
                break
        else:
            raise AssertionError("the second request never reached the queue")
        server.terminate()
        events = [line for line in lines if line.startswith("data: ")]
    queued.join(60)
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "drain timeout" in error["message"]
    cut = waiting[0]
    assert cut.status_code == 503 and cut.headers["content-type"] == "application/json"
    assert "drain timeout" in cut.json()["error"]["message"]
    http.close()
    assert server.stop() == 0, "".join(server.stderr)
