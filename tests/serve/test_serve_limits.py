"""`lorakit serve` against hostile and careless clients: capped bodies, prompts and stop strings (each refusal
naming its limit), a server that keeps answering /health while a flood of maximal requests is refused, fields
that would change a request's meaning refused by name, bad adapter files refused as 400s, and the access log.

One real server for the module, with small caps so that a cap-sized request is cheap to send.
"""

from __future__ import annotations

import json
import select
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _serving  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

BODY = 1_000_000  # --max-body-bytes
CHARS = 200_000  # --max-prompt-chars
TOKENS = 512  # --max-prompt-tokens (the context is 1024)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    model = _serving.tiny_chat_llama(root / "llama")
    served = root / "adapters"
    adapter = _serving.make_adapter(model, served / "a", 1)
    server = _serving.Server(
        "--model",
        model,
        "--adapter",
        f"a={adapter}",
        "--adapter-root",
        served,
        "--max-body-bytes",
        BODY,
        "--max-prompt-chars",
        CHARS,
        "--max-prompt-tokens",
        TOKENS,
        "--max-stops",
        4,
        "--max-stop-chars",
        64,
        "--log-format",
        "json",
    )
    yield {"server": server, "client": server.client(), "served": served, "adapter": adapter}
    assert server.stop() == 0, "".join(server.stderr)


def _post(server, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120, **kwargs)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text[:500]
    return r.json()["error"]


# -- caps --------------------------------------------------------------------------------------------------


def test_each_cap_is_refused_naming_its_limit(setup):
    server = setup["server"]
    e = _error(_post(server, "/v1/completions", {"model": "base", "prompt": "a " * BODY}), 413)
    assert "max_body_bytes" in e["message"] and str(BODY) in e["message"]
    e = _error(_post(server, "/v1/completions", {"model": "base", "prompt": "a" * (CHARS + 1)}), 400)
    assert "max_prompt_chars" in e["message"] and e["param"] == "prompt"
    chat = [{"role": "user", "content": "a" * CHARS}]
    e = _error(_post(server, "/v1/chat/completions", {"model": "base", "messages": chat}), 400)
    assert "max_prompt_chars" in e["message"] and e["param"] == "messages"
    many = [{"role": "user", "content": "hi"}] * 5000
    e = _error(_post(server, "/v1/chat/completions", {"model": "base", "messages": many}), 400)
    assert "4096" in e["message"] and e["param"] == "messages"
    e = _error(_post(server, "/v1/completions", {"model": "base", "prompt": [5] * (TOKENS + 1)}), 400)
    assert "max_prompt_tokens" in e["message"] and e["param"] == "prompt"
    e = _error(_post(server, "/v1/completions", {"model": "base", "prompt": "hello " * (TOKENS + 1)}), 400)
    assert "max_prompt_tokens" in e["message"]
    e = _error(_post(server, "/v1/completions", {"model": "base", "prompt": "x", "stop": list("abcde")}), 400)
    assert "max_stops" in e["message"] and e["param"] == "stop"
    e = _error(_post(server, "/v1/completions", {"model": "base", "prompt": "x", "stop": "z" * 65}), 400)
    assert "max_stop_chars" in e["message"] and e["param"] == "stop"
    four = setup["client"].completions.create(model="a", prompt="hello world", max_tokens=4, stop=list("wxyz"))
    assert four.choices[0].finish_reason in ("stop", "length")


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("chunked", [False, True])
def test_a_300_mb_body_is_refused_before_it_is_read(setup, chunked):
    """The client sends 300 MB in 1 MB pieces and stops as soon as the answer arrives: a 413, long before."""
    host, port = setup["server"].url.removeprefix("http://").rsplit(":", 1)
    total, piece = 300 * 2**20, b"x" * 2**20
    framing = b"Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}".encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + framing + b"\r\n\r\n"
        )
        sent = 0
        while sent < total and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        head = _read_response(sock)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert sent <= 16 * 2**20, f"the server let {sent} bytes in before answering"


def test_health_stays_fast_while_a_flood_of_maximal_requests_is_refused(setup):
    """p99 of /health under 0.5 s while 48 cap-sized and over-cap requests (8 at a time) are refused."""
    server, done, latencies = setup["server"], threading.Event(), []
    cap_sized = {"model": "base", "prompt": "hello " * (CHARS // 6)}  # within every byte/char cap: tokenized
    floods = [
        (cap_sized, 400),  # ... then over --max-prompt-tokens
        ({"model": "base", "prompt": "a" * (CHARS + 1)}, 400),  # over --max-prompt-chars
        ({"model": "base", "prompt": "a " * BODY}, 413),  # over --max-body-bytes
        ({"model": "base", "messages": [{"role": "user", "content": "hello " * (CHARS // 7)}]}, 400),
    ]
    started = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not done.is_set():
                t = time.perf_counter()
                assert c.get("/health").status_code == 200
                latencies.append(time.perf_counter() - t)
                started.set()

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        assert started.wait(30)
        path = {True: "/v1/chat/completions", False: "/v1/completions"}
        with ThreadPoolExecutor(8) as pool:
            jobs = [pool.submit(_post, server, path["messages" in b], b) for i in range(12) for b, _ in floods]
            statuses = [j.result().status_code for j in jobs]
    finally:
        done.set()
        poller.join(60)
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(
        f"/health during the flood: {len(latencies)} calls, p50 {latencies[len(latencies) // 2]:.3f}s, "
        f"p99 {p99:.3f}s, max {latencies[-1]:.3f}s"
    )
    assert len(latencies) >= 20, latencies
    assert p99 < 0.5, f"/health p99 {p99:.3f}s over {len(latencies)} calls (max {latencies[-1]:.3f}s)"
    assert statuses == [s for _ in range(12) for _, s in floods]


# -- fields and values that used to be 500s, or silently ignored -------------------------------------------


def test_seed_out_of_range_is_a_400_naming_it(setup):
    for seed in (2**64, -(2**63) - 1):
        e = _error(_post(setup["server"], "/v1/completions", {"model": "base", "prompt": "x", "seed": seed}), 400)
        assert e["param"] == "seed"
    got = setup["client"].completions.create(model="base", prompt="x", max_tokens=2, seed=2**63 - 1, n=2)
    assert len(got.choices) == 2


@pytest.mark.parametrize(
    "field, value",
    [
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("tool_choice", "required"),
        ("response_format", {"type": "json_object"}),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1.0),
        ("best_of", 3),
        ("logit_bias", {"5": 100}),
        ("min_p", 0.1),
    ],
)
def test_fields_that_change_the_answer_are_refused_by_name(setup, field, value):
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], field: value}
    e = _error(_post(setup["server"], "/v1/chat/completions", body), 400)
    assert e["param"] == field and "not supported" in e["message"]


def test_completion_suffix_is_refused_and_neutral_values_are_served(setup):
    client = setup["client"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt="x", suffix="the end", max_tokens=2)
    assert e.value.body["param"] == "suffix"
    got = client.chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        presence_penalty=0,
        frequency_penalty=0,
        tools=[],
        tool_choice="none",
        response_format={"type": "text"},
    )
    assert got.choices[0].finish_reason in ("stop", "length")


def test_bad_load_requests_are_400s_naming_the_field(setup):
    server, served = setup["server"], setup["served"]
    for path in ("a\x00b", "a" * 5000):
        e = _error(_post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path}), 400)
        assert e["param"] == "lora_path", e
    task = setup["adapter"] / "lorakit_task.json"
    cases = {
        "listed": '{"task": "causal-lm", "id2label": ["neg", "pos"]}',
        "deep": '{"task": "causal-lm", "id2label": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "gaps": '{"task": "causal-lm", "id2label": {"0": "neg", "5": "pos"}}',
    }
    for name, text in cases.items():
        shutil.copytree(setup["adapter"], served / name)
        (served / name / task.name).write_text(text)
        e = _error(_post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": name}), 400)
        assert "lorakit_task.json" in e["message"] and e["param"] == "lora_path", (name, e)
    assert [m.id for m in setup["client"].models.list().data] == ["llama", "a"]


# -- the access log ------------------------------------------------------------------------------------------


def _access_lines(server, path: str, count: int) -> list[dict]:
    """The next `count` JSON access lines for `path` on the server's stdout (each read as it is written)."""
    found = []
    while len(found) < count:
        entry = json.loads(server.wait_for(f'"path": "{path}"', timeout=60))
        found.append(entry)
    return found


def test_each_request_has_one_json_access_line(setup):
    server, client = setup["server"], setup["client"]
    got = client.completions.create(model="a", prompt="one two three", max_tokens=7, temperature=0)
    want = (200, "a", got.usage.prompt_tokens, got.usage.completion_tokens)
    line = _access_lines(server, "/v1/completions", 1)[0]
    while (line["status"], line["adapter"], line["prompt_tokens"], line["completion_tokens"]) != want:
        line = _access_lines(server, "/v1/completions", 1)[0]  # the lines of earlier tests' requests come first
    assert line["method"] == "POST"
    assert 0 < line["ttft_s"] <= line["total_s"] and line["client"].startswith("127.0.0.1:")
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    line = _access_lines(server, "/v1/nothing", 1)[0]
    assert line["status"] == 404 and line["adapter"] is None and line["ttft_s"] is None
