"""`lorakit serve` through the real `openai` client: models, completions, chat, streaming, sampling, errors, metrics.

One real server subprocess (a tiny random llama with two adapters) for the module; every greedy answer is
compared with the same prompt generated alone in this process (`generate` under `use_adapter`).
"""

from __future__ import annotations

import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _serving  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

PROMPTS = ["the cat sat", "hello world", "one two three", "the quick brown fox"]
SYSTEM = {"role": "system", "content": "you are a helpful bot"}
SYSTEM_FIRST = (  # ChatML that opens every conversation with SYSTEM's message
    "{{ '<|im_start|>system\\nyou are a helpful bot<|im_end|>\\n' }}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = _serving.tiny_chat_llama(root / "llama")
    adapters = {"a": _serving.make_adapter(model, root / "a", 1), "b": _serving.make_adapter(model, root / "b", 2)}
    shutil.copytree(adapters["a"], root / "t")  # adapter a, trained (say) with its own chat template
    (root / "t" / "chat_template.jinja").write_text(SYSTEM_FIRST, encoding="utf-8")
    server = _serving.Server(
        "--model",
        model,
        "--adapter",
        f"a={adapters['a']}",
        "--adapter",
        f"b={adapters['b']}",
        "--adapter",
        f"t={root / 't'}",
    )
    yield {
        "server": server,
        "client": server.client(),
        "ref": _serving.Reference(model, adapters),
        "model": model,
        "paths": adapters,
    }
    assert server.stop() == 0, "".join(server.stderr)


def test_models_lists_the_base_and_every_adapter(setup):
    models = setup["client"].models.list()
    assert [m.id for m in models.data] == ["llama", "a", "b", "t"]
    assert models.data[1].model_extra["parent"] == "llama"


def test_models_says_each_adapters_lineage_from_its_sidecar(setup):
    from lorakit.files import provenance
    from lorakit.serve.lineage import adapter_hash

    cards = {m.id: m.model_extra for m in setup["client"].models.list().data}
    assert cards["llama"].get("lineage") is None  # the base has none: it is the served one
    saved = provenance.read(setup["paths"]["a"])
    assert cards["a"]["lineage"] == {
        "base_fingerprint": provenance.fingerprint_id(saved.base),
        "base_class": "LlamaForCausalLM",
        "base_path": str(setup["model"].resolve()),
        "adapter_hash": adapter_hash(saved.tensors),
        "base_match": True,
        "differences": [],
    }
    lineages = {n: cards[n]["lineage"] for n in "abt"}
    assert all(x["base_match"] is True for x in lineages.values())
    assert lineages["t"] == lineages["a"] != lineages["b"]  # t holds a's tensors; b its own, on the same base
    assert lineages["b"]["base_fingerprint"] == lineages["a"]["base_fingerprint"]


@pytest.mark.parametrize("model", ["llama", "base", "a", "b"])
def test_greedy_completions_equal_generate_alone(setup, model):
    ref, client = setup["ref"], setup["client"]
    adapter = None if model in ("llama", "base") else model
    got = client.completions.create(model=model, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    want = [ref.greedy(adapter, ref.ids(p), 12, ref.eos) for p in PROMPTS]
    assert [(c.text, c.finish_reason) for c in got.choices] == [(t, r) for t, _, r in want]
    assert got.usage.prompt_tokens == sum(len(ref.ids(p)) for p in PROMPTS)
    assert got.usage.completion_tokens == sum(n for _, n, _ in want)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_adapters_change_the_output(setup):
    client = setup["client"]
    texts = {
        m: client.completions.create(model=m, prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
        for m in ("base", "a", "b")
    }
    assert len(set(texts.values())) == 3, texts


def test_streaming_gives_what_the_whole_response_gives(setup):
    client = setup["client"]
    whole = client.completions.create(model="a", prompt=PROMPTS[1], max_tokens=10, temperature=0)
    chunks = list(
        client.completions.create(
            model="a",
            prompt=PROMPTS[1],
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices


def test_chat_renders_the_template_and_stops_at_end_of_turn(setup):
    ref, client = setup["ref"], setup["client"]
    messages = [{"role": "system", "content": "you are a helpful bot"}, {"role": "user", "content": "hello world"}]
    got = client.chat.completions.create(model="b", messages=messages, max_tokens=20, temperature=0)
    text, n, reason = ref.greedy("b", ref.chat_ids(messages), 20, ref.chat_stops)
    assert (got.choices[0].message.content, got.choices[0].finish_reason) == (text, reason)
    assert got.choices[0].message.role == "assistant" and got.usage.completion_tokens == n
    assert got.usage.prompt_tokens == len(ref.chat_ids(messages))
    stream = client.chat.completions.create(model="b", messages=messages, max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason


def test_n_samples_with_a_seed_are_reproducible(setup):
    client = setup["client"]
    kwargs = dict(model="a", prompt=PROMPTS[2], max_tokens=8, temperature=1.0, top_p=0.9, n=3, seed=7)
    one, two = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in one.choices] == [0, 1, 2]
    assert [c.text for c in one.choices] == [c.text for c in two.choices]
    assert len({c.text for c in one.choices}) > 1  # seed + j per sample: the samples differ
    assert 3 <= one.usage.completion_tokens <= 3 * 8


def test_stop_strings_cut_the_text(setup):
    client = setup["client"]
    full = client.completions.create(model="base", prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    word = full.split()[2]
    got = client.completions.create(model="base", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[word])
    assert got.choices[0].finish_reason == "stop"
    assert got.choices[0].text == full[: full.index(word)]


def test_concurrent_requests_are_neither_lost_nor_mixed_up(setup):
    ref, client = setup["ref"], setup["client"]
    jobs = [(m, p) for m in ("base", "a", "b") for p in PROMPTS]

    def ask(job):
        m, p = job
        return client.completions.create(model=m, prompt=p, max_tokens=10, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    want = [ref.greedy(None if m == "base" else m, ref.ids(p), 10, ref.eos)[0] for m, p in jobs]
    assert got == want


# -- bad input: OpenAI error bodies --------------------------------------------------------------------


def _post(setup, path: str, content: str | bytes) -> httpx.Response:
    return httpx.post(setup["server"].url + path, content=content, headers={"content-type": "application/json"})


def test_malformed_json_is_a_400_error_body(setup):
    r = _post(setup, "/v1/completions", b'{"model": "a", "prompt": ')
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error" and "not valid JSON" in r.json()["error"]["message"]
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", "5"), ("temperature", "hot"), ("n", 0), ("stop", [1]), ("prompt", {"x": 1}), ("top_p", 0)],
)
def test_wrong_field_types_name_the_field(setup, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        setup["client"].completions.create(model="a", prompt="the cat", max_tokens=4, extra_body={field: value})
    assert e.value.status_code == 400 and e.value.body["param"].split(".")[0] == field


def test_unknown_fields_are_ignored(setup):
    got = setup["client"].completions.create(
        model="a", prompt="the cat", max_tokens=2, extra_body={"best_of": 1, "foo": "x"}
    )
    assert got.usage.completion_tokens >= 1


def test_an_unknown_model_is_a_404(setup):
    with pytest.raises(openai.NotFoundError) as e:
        setup["client"].completions.create(model="nope", prompt="the cat", max_tokens=2)
    assert "nope" in str(e.value) and e.value.body["code"] == "model_not_found"


def test_prompt_plus_max_tokens_over_the_context_names_both(setup):
    with pytest.raises(openai.BadRequestError) as e:
        setup["client"].completions.create(model="a", prompt="the cat sat", max_tokens=_serving.CONTEXT)
    message = e.value.body["message"]
    assert "(4 tokens)" in message and f"({_serving.CONTEXT})" in message and str(_serving.CONTEXT) in message


def test_chat_uses_the_template_an_adapter_trained_with(setup):
    ref, client = setup["ref"], setup["client"]
    messages = [{"role": "user", "content": "hello world"}]
    own = client.chat.completions.create(model="t", messages=messages, max_tokens=8, temperature=0)
    text, n, reason = ref.greedy("a", ref.chat_ids([SYSTEM, *messages]), 8, ref.chat_stops)  # t's weights are a's
    assert own.usage.prompt_tokens == len(ref.chat_ids([SYSTEM, *messages])) > len(ref.chat_ids(messages))
    assert (own.choices[0].message.content, own.choices[0].finish_reason) == (text, reason)
    base = client.chat.completions.create(model="a", messages=messages, max_tokens=8, temperature=0)
    assert base.usage.prompt_tokens == len(ref.chat_ids(messages))  # the tokenizer's own template


def test_chat_with_a_bad_role_is_a_400(setup):
    with pytest.raises(openai.BadRequestError) as e:
        setup["client"].chat.completions.create(model="a", messages=[{"role": "robot", "content": "hi"}])
    assert "robot" in e.value.body["message"] and e.value.body["param"] == "messages.0.role"


def test_metrics_count_requests_tokens_and_latency_per_adapter(setup):
    client = setup["client"]
    before = httpx.get(setup["server"].url + "/metrics").text
    client.completions.create(model="b", prompt="hello world", max_tokens=5, temperature=0)
    after = httpx.get(setup["server"].url + "/metrics").text
    m = _serving.metric
    assert (
        m(after, "lorakit_generation_tokens_total", adapter="b")
        - m(before, "lorakit_generation_tokens_total", adapter="b")
        >= 1
    )
    assert (
        m(after, "lorakit_time_to_first_token_seconds_count", adapter="b")
        == m(before, "lorakit_time_to_first_token_seconds_count", adapter="b") + 1
    )
    assert m(after, "lorakit_time_per_output_token_seconds_count", adapter="b") > 0
    assert m(after, "lorakit_batch_size_count") > 0 and m(after, "lorakit_loaded_adapters") == 3
    assert sum(m(after, "lorakit_requests_total", adapter="b", finish_reason=r) for r in ("stop", "length")) >= 1


def test_each_request_has_one_access_line(setup):
    server = setup["server"]
    assert httpx.get(server.url + "/v1/models").status_code == 200
    line = server.wait_for('"GET /v1/models" 200', timeout=60)
    assert line.startswith("127.0.0.1:") and "adapter=- " in line and "total=" in line
    got = setup["client"].completions.create(model="b", prompt="good morning", max_tokens=9, temperature=0)
    want = f"adapter=b prompt_tokens={got.usage.prompt_tokens} completion_tokens={got.usage.completion_tokens} "
    line = server.wait_for('"POST /v1/completions" 200 ' + want, timeout=60)  # earlier requests' lines first
    ttft, total = (float(line.split(k)[1].split("s")[0]) for k in (" ttft=", " total="))
    assert 0 < ttft <= total, line


def test_unload_is_refused_like_load_without_an_adapter_root(setup):
    r = httpx.post(setup["server"].url + "/v1/unload_lora_adapter", json={"lora_name": "b"})
    assert r.status_code == 400 and "adapter root" in r.json()["error"]["message"], r.text
    assert "b" in [m.id for m in setup["client"].models.list().data]
    got = setup["client"].completions.create(model="b", prompt="hello", max_tokens=2)
    assert got.choices[0].finish_reason in ("stop", "length")
