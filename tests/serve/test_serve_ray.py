"""lorakit on Ray Serve (`lorakit.serve.ray_serve`): a local Ray cluster, 2 replicas of a tiny llama, 4 adapters at
most 2 per replica, through the real openai client. Requests for an adapter land on the replica that holds it
(Ray's model multiplexing), and greedy answers equal the same prompt generated alone in this process."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _serving  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray cluster and its worker processes

ADAPTERS = "abcd"
PROMPT = "hello world"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray import serve

    from lorakit.serve.ray_serve import build_app

    root = tmp_path_factory.mktemp("ray")
    model = _serving.tiny_chat_llama(root / "llama")
    adapters = {n: _serving.make_adapter(model, root / n, seed) for seed, n in enumerate(ADAPTERS, start=1)}
    env = {k: _serving.ENV[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")} | {"OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")  # the replicas import this checkout's lorakit
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, logging_level="ERROR")
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(model, adapters, replicas=2, adapters_per_replica=2, ray_actor_options={"num_cpus": 1})
        serve.run(app, route_prefix="/")  # returns once every replica is up
        yield {"url": f"http://127.0.0.1:{port}", "ref": _serving.Reference(model, adapters), "model": model}
    finally:
        serve.shutdown()
        ray.shutdown()


def _client(cluster):
    import openai

    return openai.OpenAI(base_url=cluster["url"] + "/v1", api_key="none", max_retries=0, timeout=120)


def _ask(client, model: str) -> tuple[str, int, str]:
    """(replica, that replica's adapter loads so far, greedy text) of one completion."""
    raw = client.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
    return raw.headers["x-lorakit-replica"], int(raw.headers["x-lorakit-adapter-loads"]), raw.parse().choices[0].text


def _round(client) -> dict[str, tuple[str, int, str]]:
    return {n: _ask(client, n) for n in ADAPTERS}


def test_requests_for_an_adapter_land_on_the_replica_holding_it(cluster):
    ref, client = cluster["ref"], _client(cluster)
    want = {n: ref.greedy(n, ref.ids(PROMPT), 6, ref.eos)[0] for n in ADAPTERS}
    before = _round(client)  # each adapter placed on some replica; Ray learns where (pushed every 0.1 s)
    for _ in range(30):  # until a whole round loads nothing: every request found its adapter where it went
        after = _round(client)
        loads = lambda got: {r: max(n for rr, n, _ in got.values() if rr == r) for r, _, _ in got.values()}  # noqa: E731
        if loads(after) == loads(before) and {n: r for n, (r, _, _) in after.items()} == {
            n: r for n, (r, _, _) in before.items()
        }:
            break
        before = after
    else:
        raise AssertionError(f"the adapters never settled on the replicas: {after}")
    for _ in range(2):  # settled: each adapter on one replica, nothing loaded again, two adapters per replica
        again = _round(client)
        assert {n: r for n, (r, _, _) in again.items()} == {n: r for n, (r, _, _) in after.items()}
        assert loads(again) == loads(after)
    placed = [r for r, _, _ in after.values()]
    assert sorted(placed.count(r) for r in set(placed)) == [2, 2], after
    assert {n: text for n, (_, _, text) in after.items()} == want


def test_streams_chats_and_the_base_answer_as_lorakit_serve_does(cluster):
    ref, client = cluster["ref"], _client(cluster)
    chunks = list(client.completions.create(model="b", prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.greedy("b", ref.ids(PROMPT), 8, ref.eos)[0]
    messages = [{"role": "user", "content": "hello world"}]
    got = client.chat.completions.create(model="c", messages=messages, max_tokens=10, temperature=0)
    assert got.choices[0].message.content == ref.greedy("c", ref.chat_ids(messages), 10, ref.chat_stops)[0]
    base = client.completions.create(model="llama", prompt=PROMPT, max_tokens=6, temperature=0)
    assert base.choices[0].text == ref.greedy(None, ref.ids(PROMPT), 6, ref.eos)[0]
    assert [m.id for m in client.models.list().data] == ["llama", *ADAPTERS]
    import openai

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError):  # the replica's own request checks
        client.completions.create(model="a", prompt=PROMPT, max_tokens=2, temperature=-1)
