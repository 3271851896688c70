"""Property-based fuzzing of a real `lorakit serve` (a causal LM with an adapter, run-time loading on) with
schemathesis, from the server's own OpenAPI schema: every operation, every answer checked to be no 5xx and to
match the schema. The model's context is 64 tokens, so that the largest request the schema allows is quick."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _serving  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = _serving.tiny_chat_llama(root / "llama", context=64)
    served = root / "adapters"
    adapter = _serving.make_adapter(model, served / "a", 1)
    server = _serving.Server("--model", model, "--adapter", f"a={adapter}", "--adapter-root", served, "--no-access-log")
    yield server
    assert server.stop() == 0, "".join(server.stderr)


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    operations = sorted(f"{m.upper()} {p}" for p, ops in schema["paths"].items() for m in ops)
    assert operations == [
        "GET /health",
        "GET /lora-adapters",
        "GET /metrics",
        "GET /v1/models",
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /v1/load_lora_adapter",
        "POST /v1/unload_lora_adapter",
    ]
    cases, out = _serving.fuzz(server, max_examples=30, models=["base", "llama", "a"])
    print(out[out.rfind("SUMMARY") :] if "SUMMARY" in out else out[-1500:])
    print(f"schemathesis: {cases} generated test cases over {len(operations)} operations")
    assert cases >= 100, out[-3000:]
    metrics = httpx.get(server.url + "/metrics").text
    ran = sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("lorakit_requests_total{")
    )
    print(f"schemathesis: {ran:.0f} of them ran on the engine")
    assert ran >= 10, metrics  # the sampling fields were exercised, not only refused
    healthy = httpx.post(server.url + "/v1/completions", json={"model": "a", "prompt": "hello", "max_tokens": 2})
    assert healthy.status_code == 200, healthy.text  # the next normal request is served
