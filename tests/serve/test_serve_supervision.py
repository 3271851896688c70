"""`lorakit serve` whose engine thread dies for real: /health says so, every request gets 503, the process exits 1.

The model is the tiny llama with its own code (`--trust-remote-code`): its forward raises an exception nothing in
the engine catches (a BaseException) when a prompt holds the trigger token, the way a bug in the loop would
escape it. One server for the module, which the test kills that way. It serves two adapters with `--max-loaded 1`,
so a request for the second waits for a slot while the first is in flight: the engine's death reaches it there too.
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

TRIGGER_CODE = '''
from transformers import LlamaConfig, LlamaForCausalLM


class TriggerConfig(LlamaConfig):
    model_type = "trigger-llama"


class EngineKiller(BaseException):
    """Escapes every `except Exception`."""


class TriggerLlamaForCausalLM(LlamaForCausalLM):
    config_class = TriggerConfig

    def forward(self, input_ids=None, **kwargs):
        if input_ids is not None and input_ids.shape[1] > 1 and (input_ids == self.config.trigger_id).any():
            raise EngineKiller("the test's trigger token")
        return super().forward(input_ids=input_ids, **kwargs)
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("supervision")
    model = _serving.tiny_chat_llama(root / "llama")
    adapters = {n: _serving.make_adapter(model, root / n, seed) for n, seed in (("a", 1), ("b", 2))}
    for d in adapters.values():  # made on the plain llama, whose model_type the trigger config renames
        (d / "lorakit.json").unlink()
    (model / "trigger.py").write_text(TRIGGER_CODE)
    config = json.loads((model / "config.json").read_text())
    config.update(
        model_type="trigger-llama",
        architectures=["TriggerLlamaForCausalLM"],
        trigger_id=1,  # <unk>
        auto_map={"AutoConfig": "trigger.TriggerConfig", "AutoModelForCausalLM": "trigger.TriggerLlamaForCausalLM"},
    )
    (model / "config.json").write_text(json.dumps(config))
    server = _serving.Server(
        "--model",
        model,
        "--trust-remote-code",
        "--max-loaded",
        "1",
        *(f"--adapter={n}={d}" for n, d in adapters.items()),
    )
    yield server
    server.stop()


def test_a_dead_engine_answers_503_everywhere_and_the_process_exits_1(server):
    http = httpx.Client(base_url=server.url, timeout=60)
    assert http.get("/health").json() == {"status": "ready"}
    body = {"model": "a", "prompt": "the cat sat", "max_tokens": 900, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # in flight: it has its first token
        waiting: dict = {}  # a request for b waits for the one adapter slot, which a holds
        other = threading.Thread(
            target=lambda: waiting.update(
                r=httpx.post(
                    server.url + "/v1/completions", json={"model": "b", "prompt": "hi", "max_tokens": 2}, timeout=60
                )
            )
        )
        other.start()
        while _serving.metric(http.get("/metrics").text, "lorakit_waiting_requests") < 1:
            assert other.is_alive(), waiting  # it must wait, not be answered
        killed = http.post("/v1/completions", json={"model": "base", "prompt": [2, 1, 5], "max_tokens": 3})
        health = http.get("/health")
        later = http.post("/v1/completions", json={"model": "base", "prompt": "hello", "max_tokens": 2})
        rest = [line for line in lines if line.startswith("data: ")]
        other.join(timeout=60)
    assert killed.status_code == 503 and "EngineKiller: the test's trigger token" in killed.json()["error"]["message"]
    assert health.status_code == 503
    assert health.json()["status"] == "failed" and "EngineKiller" in health.json()["reason"]
    assert later.status_code == 503 and later.json()["error"]["code"] == "engine_failed"
    waited = waiting["r"]  # woken when a's request ended, it found the engine failed: 503, not 500
    assert waited.status_code == 503 and "EngineKiller" in waited.json()["error"]["message"], waited.text
    error = json.loads(rest[-2].removeprefix("data: "))["error"]  # the in-flight stream: an error event, then [DONE]
    assert rest[-1] == "data: [DONE]" and error["type"] == "server_error" and "EngineKiller" in error["message"]
    http.close()
    assert server.proc.wait(timeout=60) == 1  # a supervisor restarts it
    assert any("engine failed" in line for line in server.stderr), "".join(server.stderr)
    # the gate's answers are logged like any route's: the access log wraps the supervision
    access = list(iter(lambda: server.lines.get(timeout=30), None))  # stdout to its end (the process has exited)
    assert any('"GET /health" 503' in line for line in access), access
