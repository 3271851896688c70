"""Per-request adapter compositions through `lorakit serve` and the real `openai` client (`extra_body`).

One real server for the module: the tiny chat llama with three plain adapters and a DoRA one, at most three
loaded. Concurrent requests of different compositions (two weighted adapters, weight 0, a negative weight,
llama.cpp's `lora` by id and by name) and plain ones run in the same decode steps, each greedy answer equal to
the same composition built in this process by `lk.combine_adapters(method="cat")` and generated alone.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import lorakit as lk

sys.path.insert(0, str(Path(__file__).parent))
import _serving  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

PROMPTS = ["the cat sat", "hello world", "one two three", "the quick brown fox"]
ANCHOR = 200  # tokens of a base stream that runs through every concurrent request
LONG = 600  # tokens: a composition still running while the test does what it needs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    model = _serving.tiny_chat_llama(root / "llama")
    adapters = {n: _serving.make_adapter(model, root / n, seed) for seed, n in enumerate("abc", start=1)}
    adapters["d"] = _serving.make_adapter(model, root / "d", 4, targets=("k_proj", "down_proj"), use_dora=True)
    server = _serving.Server(
        "--model",
        model,
        *(x for n, p in adapters.items() for x in ("--adapter", f"{n}={p}")),
        "--max-loaded",
        "3",
        "--max-batch",
        "16",
    )
    yield {"server": server, "client": server.client(), "ref": _serving.Reference(model, adapters), "paths": adapters}
    assert server.stop() == 0, "".join(server.stderr)


def composed(ref, weights: dict[str, float] | None, ids: list[int], max_tokens: int, stops) -> tuple[str, int, str]:
    """What the composition generates alone: one adapter built by `combine_adapters(cat)`, then deleted."""
    key = lk.row_key(weights)
    if key is None or isinstance(key, str):
        return ref.greedy(key, ids, max_tokens, stops)
    lk.combine_adapters(ref.model, dict(key), "composed", method="cat")
    try:
        return ref.greedy("composed", ids, max_tokens, stops)
    finally:
        lk.delete_adapter(ref.model, "composed")


def post(setup, body: dict, path: str = "/v1/completions") -> httpx.Response:
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 0, **body}
    return httpx.post(setup["server"].url + path, json=body, timeout=60)


def metrics(setup) -> str:
    return httpx.get(setup["server"].url + "/metrics").text


def test_lora_adapters_lists_every_adapter_with_its_id(setup):
    got = httpx.get(setup["server"].url + "/lora-adapters").json()
    paths = setup["paths"]
    assert got == [{"id": i, "path": str(paths[n]), "name": n, "scale": 0.0} for i, n in enumerate("abcd")]
    schema = httpx.get(setup["server"].url + "/openapi.json").json()["components"]["schemas"]
    assert {"adapters", "lora"} <= set(schema["CompletionRequest"]["properties"])
    assert {"adapters", "lora"} <= set(schema["ChatRequest"]["properties"])


# (request fields, the composition as {name: weight}; None: the base)
CASES = [
    ({"model": "llama"}, None),
    ({"model": "a"}, {"a": 1.0}),
    ({"model": "llama", "extra_body": {"adapters": [{"name": "a", "weight": 0.7}, {"name": "b", "weight": 0.5}]}},
     {"a": 0.7, "b": 0.5}),
    ({"model": "llama", "extra_body": {"adapters": [{"name": "c", "weight": 0}]}}, None),
    ({"model": "llama", "extra_body": {"adapters": [{"name": "b", "weight": -0.8}, {"name": "c"}]}},
     {"b": -0.8, "c": 1.0}),
    ({"model": "llama", "extra_body": {"lora": [{"id": 0, "scale": 0.5}, {"id": 2, "scale": 1.5}]}},
     {"a": 0.5, "c": 1.5}),
    ({"model": "llama", "extra_body": {"lora": [{"name": "c", "scale": -0.5}, {"name": "b", "scale": 0.3}]}},
     {"c": -0.5, "b": 0.3}),
    ({"model": "llama", "extra_body": {"adapters": []}}, None),
    ({"model": "base", "extra_body": {"adapters": [{"name": "a", "weight": 1.0}, {"name": "b", "weight": 0.0}]}},
     {"a": 1.0}),
]  # fmt: skip


def test_concurrent_compositions_share_decode_steps_and_each_equals_the_composition_alone(setup):
    client, ref = setup["client"], setup["ref"]
    before = metrics(setup)
    anchor = client.completions.create(model="llama", prompt="x", max_tokens=ANCHOR, temperature=0, stream=True)
    next(anchor)  # a base row now decodes for ANCHOR steps, with every request below joining its steps
    chat = [{"role": "user", "content": "hello there"}]

    def one(i: int):
        fields, _ = CASES[i % len(CASES)]
        if i < len(CASES):
            got = client.completions.create(prompt=PROMPTS[3], max_tokens=16, temperature=0, **fields)
            return got.choices[0].text, got.choices[0].finish_reason
        got = client.chat.completions.create(messages=chat, max_tokens=16, temperature=0, **fields)
        return got.choices[0].message.content, got.choices[0].finish_reason

    with ThreadPoolExecutor(len(CASES) + 3) as pool:
        answers = list(pool.map(one, range(len(CASES) + 3)))
    rest = "".join(c.choices[0].text for c in anchor)
    for i, (text, reason) in enumerate(answers):
        weights = CASES[i % len(CASES)][1]
        if i < len(CASES):
            want = composed(ref, weights, ref.ids(PROMPTS[3]), 16, ref.eos)
        else:
            want = composed(ref, weights, ref.chat_ids(chat), 16, ref.chat_stops)
        assert (text, reason) == (want[0], want[2]), (i, CASES[i % len(CASES)])
    assert answers[0] == answers[3] == answers[7]  # the base: plain, every weight 0, an empty list (one prompt)
    assert len({t for t, _ in answers[:3] + answers[4:7]}) == 6  # every composition changes the text
    assert rest  # the anchor ran on
    after = metrics(setup)
    steps = _serving.metric(after, "lorakit_batch_size_count") - _serving.metric(before, "lorakit_batch_size_count")
    small = sum(_serving.metric(m, "lorakit_batch_size_bucket", le="4.0") * s for m, s in ((after, 1), (before, -1)))
    assert steps - small > 0, after  # some steps ran 5+ rows: at most three of them the base's, so 2+ compositions
    for names in ("a+b", "a+c", "b+c"):  # a composition's label: its names, sorted, joined by "+"
        assert f'lorakit_requests_total{{adapter="{names}",' in after, after


def test_access_log_labels_a_composition_by_its_names(setup):
    got = post(setup, {"model": "llama", "adapters": [{"name": "c", "weight": 2.0}, {"name": "a", "weight": -1}]})
    assert got.status_code == 200, got.text
    assert '"POST /v1/completions" 200 adapter=a+c ' in setup["server"].wait_for("adapter=a+c ")


REFUSED = [  # body, status, the param the error names
    ({"model": "llama", "adapters": [{"name": "a"}], "lora": [{"id": 0, "scale": 1}]}, 400, "lora"),
    ({"model": "a", "adapters": [{"name": "b", "weight": 0.5}]}, 400, "adapters"),
    ({"model": "b", "lora": [{"id": 0, "scale": 0.5}]}, 400, "lora"),
    ({"model": "nope", "adapters": [{"name": "a"}]}, 404, "model"),
    ({"model": "llama", "adapters": [{"name": "a"}, {"name": "zz", "weight": 0.5}]}, 404, "adapters[1].name"),
    ({"model": "llama", "lora": [{"id": 4, "scale": 0.5}]}, 404, "lora[0].id"),
    ({"model": "llama", "lora": [{"id": -1, "scale": 0.5}]}, 404, "lora[0].id"),
    ({"model": "llama", "lora": [{"id": 1, "scale": 1}, {"name": "zz", "scale": 1}]}, 404, "lora[1].name"),
    ({"model": "llama", "lora": [{"id": 0, "name": "a", "scale": 1}]}, 400, "lora[0]"),
    ({"model": "llama", "lora": [{"scale": 1}]}, 400, "lora[0]"),
    ({"model": "llama", "lora": [{"id": 0}]}, 400, "lora.0.scale"),
    ({"model": "llama", "adapters": [{"name": "a"}, {"name": "a", "weight": 0.5}]}, 400, "adapters[1].name"),
    ({"model": "llama", "lora": [{"id": 0, "scale": 1}, {"name": "a", "scale": 1}]}, 400, "lora[1].name"),
    ({"model": "llama", "adapters": [{"name": "a", "weight": 1e300}]}, 400, "adapters[0].weight"),
    ({"model": "llama", "adapters": [{"name": "a", "weight": "1"}]}, 400, "adapters.0.weight"),
    ({"model": "llama", "adapters": [{"name": "b"}, {"name": "d", "weight": 1.0}]}, 400, "adapters[1]"),
    ({"model": "llama", "lora": [{"id": 3, "scale": 0.5}]}, 400, "lora[0]"),
    ({"model": "llama", "adapters": [{"name": n} for n in "abcd"]}, 400, "adapters"),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_every_bad_composition_is_refused_naming_the_field(setup, path):
    for body, status, param in REFUSED:
        if path.endswith("chat/completions"):
            body = {**body, "messages": [{"role": "user", "content": "hi"}]}
        got = post(setup, body, path)
        assert (got.status_code, got.json()["error"]["param"]) == (status, param), (body, got.text)
    for raw in ('{"name": "a", "weight": NaN}', '{"name": "a", "weight": -Infinity}'):  # JSON's extensions
        body = '{"model": "llama", "prompt": "hi", "max_tokens": 2, "adapters": [' + raw + "]}"
        json_type = {"Content-Type": "application/json"}
        got = httpx.post(setup["server"].url + "/v1/completions", content=body, headers=json_type, timeout=60)
        assert (got.status_code, got.json()["error"]["param"]) == (400, "adapters[0].weight"), got.text
    with pytest.raises(openai.NotFoundError) as e:  # what the openai client sees
        setup["client"].completions.create(model="llama", prompt="hi", extra_body={"lora": [{"id": 9, "scale": 1}]})
    assert e.value.body["param"] == "lora[0].id" and "GET /lora-adapters" in e.value.body["message"]
    alone = post(setup, {"model": "llama", "adapters": [{"name": "d"}]})  # DoRA alone at weight 1: served
    assert alone.status_code == 200, alone.text
    assert alone.json()["choices"][0]["text"] == post(setup, {"model": "d"}).json()["choices"][0]["text"]


def test_max_loaded_never_evicts_an_adapter_a_running_composition_uses(setup):
    client, ref = setup["client"], setup["ref"]
    weights = {"a": 0.4, "b": -0.6, "c": 0.9}
    body = {"adapters": [{"name": n, "weight": w} for n, w in weights.items()]}
    stream = client.completions.create(
        model="llama", prompt=PROMPTS[3], max_tokens=LONG, temperature=0, stream=True, extra_body=body
    )
    text = next(stream).choices[0].text  # a, b and c are loaded and held: --max-loaded 3 leaves no room for d
    waited: dict[str, object] = {}

    def dora() -> None:
        waited["answer"] = client.completions.create(model="d", prompt=PROMPTS[0], max_tokens=8, temperature=0)

    thread = threading.Thread(target=dora)
    thread.start()
    for _ in range(3000):  # d's request waits for a slot (an HTTP round trip per poll; bounded)
        if _serving.metric(metrics(setup), "lorakit_waiting_requests") == 1:
            break
    else:
        raise AssertionError("the request for d never waited: " + metrics(setup))
    for _, chunk in zip(range(30), stream, strict=False):  # the composition decodes on while d waits
        text += chunk.choices[0].text
    assert "answer" not in waited and _serving.metric(metrics(setup), "lorakit_loaded_adapters") == 3
    stream.close()  # the client leaves: its request is cancelled and lets go of a, b and c
    thread.join(60)
    want = composed(ref, weights, ref.ids(PROMPTS[3]), 64, ref.eos)[0]
    assert len(text) > 10 and want.startswith(text)  # its adapters stayed as they were
    answer = waited["answer"].choices[0].text  # type: ignore[attr-defined]
    assert answer == ref.greedy("d", ref.ids(PROMPTS[0]), 8, ref.eos)[0]  # served once a slot was free
    assert _serving.metric(metrics(setup), "lorakit_loaded_adapters") == 3
    again = post(setup, {"model": "llama", "adapters": [{"name": "a", "weight": 0.4}, {"name": "c", "weight": 0.9}]})
    assert again.status_code == 200, again.text  # one of them was evicted for d: loaded again for this request
    assert again.json()["choices"][0]["text"] == composed(ref, {"a": 0.4, "c": 0.9}, ref.ids("hi"), 2, ref.eos)[0]
