"""`lorakit serve` at run time: adapters loaded and unloaded (vLLM's endpoints), path checks, LRU eviction,
deferred unloads, the API key; a full queue (429), a client that goes away, and SIGTERM draining (exit 0)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _serving  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "sekret"
LONG = 400  # tokens: a stream that outlasts the HTTP calls a test makes meanwhile
PROMPTS = ["the cat sat", "hello world", "one two three", "the quick brown fox", "good morning", "we like green tea"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("admin")
    model = _serving.tiny_chat_llama(root / "llama")
    served = root / "adapters"
    adapters = {n: _serving.make_adapter(model, served / n, seed) for seed, n in enumerate("cde", start=3)}
    outside = _serving.make_adapter(model, root / "outside", 9)
    _serving.make_adapter(_other_base(model, root / "other-llama"), served / "x", 10)  # saved on another base
    _peft_adapter(model, served / "p")  # no lorakit.json
    return {
        "root": root,
        "model": model,
        "served": served,
        "adapters": adapters,
        "outside": outside,
        "ref": _serving.Reference(model, {**adapters, "outside": outside}),
    }


def _other_base(model_dir: Path, out: Path) -> Path:
    """A copy of the tiny llama with one weight the adapters do not target changed: another base, same shapes."""
    import torch

    from lorakit.hf import models as hf

    model, tok = hf.load(model_dir, "causal-lm")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.25)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _peft_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter saved by PEFT itself: its two files, no lorakit.json."""
    import peft
    import torch

    from lorakit.hf import models as hf

    model, _ = hf.load(model_dir, "causal-lm")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(12))
    wrapped.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def admin(made):
    server = _serving.Server(
        "--model",
        made["model"],
        "--adapter-root",
        made["served"],
        "--max-loaded",
        "2",
        "--api-key",
        KEY,
        "--allow-base-mismatch",  # so that an adapter saved on another base loads, and /v1/models says so
    )
    yield server
    assert server.stop() == 0, "".join(server.stderr)


def _call(server, path: str, body: dict | None = None, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is None:
        return httpx.get(server.url + path, headers=headers)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


_LONG: dict = {}


def _long_prompt(ref, adapter: str | None) -> tuple[str, str]:
    """A prompt whose greedy completion runs LONG tokens without EOS under `adapter`, and that completion."""
    if adapter not in _LONG:
        _LONG[adapter] = _find_long(ref, adapter)
    return _LONG[adapter]


def _find_long(ref, adapter: str | None) -> tuple[str, str]:
    for p in PROMPTS:
        text, n, reason = ref.greedy(adapter, ref.ids(p), LONG, ref.eos)
        if reason == "length":
            return p, text
    raise AssertionError(f"every prompt hits EOS within {LONG} tokens under {adapter}")


def test_every_endpoint_but_health_needs_the_key(admin):
    assert _call(admin, "/health", key=None).status_code == 200
    for path in ("/v1/models", "/metrics"):
        r = _call(admin, path, key=None)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert _call(admin, "/v1/models", key="wrong").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        admin.client(api_key="wrong").models.list()
    assert [m.id for m in admin.client(api_key=KEY).models.list().data] == ["llama"]


def test_load_serve_unload(admin, made):
    ref, client = made["ref"], admin.client(api_key=KEY)
    r = _call(admin, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "c"})  # relative to the root
    assert r.status_code == 200, r.text
    assert "c" in [m.id for m in client.models.list().data]
    got = client.completions.create(model="c", prompt="hello world", max_tokens=8, temperature=0).choices[0]
    assert got.text == ref.greedy("c", ref.ids("hello world"), 8, ref.eos)[0]
    assert _call(admin, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "d"}).status_code == 400  # taken
    r = _call(admin, "/v1/unload_lora_adapter", {"lora_name": "c"})
    assert r.status_code == 200 and r.json()["status"] == "unloaded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c", prompt="hello world", max_tokens=2)
    assert _call(admin, "/v1/unload_lora_adapter", {"lora_name": "c"}).status_code == 404


def test_paths_outside_the_root_are_refused(admin, made):
    link = made["served"] / "sneaky"
    link.symlink_to(made["outside"], target_is_directory=True)
    cases = {
        "../outside": "'..' is not allowed",
        str(made["outside"]): "outside the adapter root",
        "sneaky": "outside the adapter root",
        "missing": "no such adapter directory",
    }
    for path, reason in cases.items():
        r = _call(admin, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
        assert r.status_code == 400 and reason in r.json()["error"]["message"], (path, r.text)
    assert [m.id for m in admin.client(api_key=KEY).models.list().data] == ["llama"]


def test_a_directory_under_the_root_whose_files_link_out_of_it_is_refused(admin, made):
    linked = made["served"] / "linked"
    linked.mkdir()
    for f in made["outside"].iterdir():
        (linked / f.name).symlink_to(f)
    r = _call(admin, "/v1/load_lora_adapter", {"lora_name": "linked", "lora_path": "linked"})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "outside the adapter root" in message and "is a link to" in message
    assert "linked" not in [m.id for m in admin.client(api_key=KEY).models.list().data]


def test_a_bad_adapter_is_refused_with_the_reason_and_serving_goes_on(admin, made):
    bad = made["served"] / "broken"
    bad.mkdir()
    for f in ("adapter_config.json", "lorakit_task.json"):
        (bad / f).write_bytes((made["adapters"]["d"] / f).read_bytes())
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    r = _call(admin, "/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": "broken"})
    assert r.status_code == 400 and "broken" in r.json()["error"]["message"]
    assert "safetensors" in r.json()["error"]["message"].lower()
    client = admin.client(api_key=KEY)
    assert "broken" not in [m.id for m in client.models.list().data]
    assert client.completions.create(model="llama", prompt="the cat", max_tokens=3, temperature=0).choices[0].text


def test_max_loaded_evicts_the_least_recently_used_and_reloads_on_demand(admin, made):
    ref, client = made["ref"], admin.client(api_key=KEY)
    for n in "cde":
        assert _call(admin, "/v1/load_lora_adapter", {"lora_name": n, "lora_path": n}).status_code == 200
    assert _serving.metric(_call(admin, "/metrics").text, "lorakit_loaded_adapters") == 2  # c was evicted
    for n in "cdec":  # each request reloads what it needs, evicting the idle one used longest ago
        got = client.completions.create(model=n, prompt="good morning", max_tokens=6, temperature=0).choices[0].text
        assert got == ref.greedy(n, ref.ids("good morning"), 6, ref.eos)[0]
        assert _serving.metric(_call(admin, "/metrics").text, "lorakit_loaded_adapters") == 2
    for n in "cde":
        assert _call(admin, "/v1/unload_lora_adapter", {"lora_name": n}).status_code == 200


def test_an_adapter_in_use_is_unloaded_after_its_requests_finish(admin, made):
    ref, client = made["ref"], admin.client(api_key=KEY)
    assert _call(admin, "/v1/load_lora_adapter", {"lora_name": "d", "lora_path": "d"}).status_code == 200
    prompt, want = _long_prompt(ref, "d")
    stream = client.completions.create(model="d", prompt=prompt, max_tokens=LONG, temperature=0, stream=True)
    chunks = [next(stream)]
    r = _call(admin, "/v1/unload_lora_adapter", {"lora_name": "d"})
    assert r.json() == {"status": "unloading", "lora_name": "d", "in_flight": 1}
    with pytest.raises(openai.NotFoundError):  # no new requests for it meanwhile
        client.completions.create(model="d", prompt="hello", max_tokens=2)
    chunks += list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "length"
    for _ in range(1000):  # the unload follows the stream's end on the engine thread
        if _serving.metric(_call(admin, "/metrics").text, "lorakit_loaded_adapters") == 0:
            break
    assert _serving.metric(_call(admin, "/metrics").text, "lorakit_loaded_adapters") == 0


def test_adapters_loaded_at_run_time_say_whether_their_base_is_the_served_one(admin, made):
    ref, client = made["ref"], admin.client(api_key=KEY)
    for n in "cxp":  # with --max-loaded 2, p evicts c: c stays known, and so does its lineage
        r = _call(admin, "/v1/load_lora_adapter", {"lora_name": n, "lora_path": n})
        assert r.status_code == 200, r.text
    cards = {m.id: m.model_extra for m in client.models.list().data}
    assert {n: (cards[n]["parent"], cards[n]["root"]) for n in "cxp"} == {
        n: ("llama", str((made["served"] / n).resolve())) for n in "cxp"
    }
    same, other, unknown = (cards[n]["lineage"] for n in "cxp")
    assert same["base_match"] is True and same["differences"] == []
    assert same["base_path"] == str(made["model"].resolve())
    assert other["base_match"] is False and other["base_fingerprint"] != same["base_fingerprint"]
    assert other["base_path"] == str((made["root"] / "other-llama").resolve())
    assert other["differences"] == ["tensor 'model.layers.0.mlp.down_proj.weight': weight values differ"]
    assert unknown == dict.fromkeys(same, None) | {"differences": []}  # PEFT-made: nothing says which base
    got = client.completions.create(model="llama", prompt="good morning", max_tokens=6, temperature=0)
    assert got.choices[0].text == ref.greedy(None, ref.ids("good morning"), 6, ref.eos)[0]  # the base still serves
    assert client.completions.create(model="x", prompt="good morning", max_tokens=2).usage.completion_tokens > 0
    for n in "cxp":
        assert _call(admin, "/v1/unload_lora_adapter", {"lora_name": n}).status_code == 200


# -- a full queue, a client that goes away, SIGTERM ----------------------------------------------------


def _wait_metric(server, name: str, value: float, **labels: str) -> None:
    """Poll /metrics until the sample reaches `value` (each poll is an HTTP round trip; bounded)."""
    for _ in range(2000):
        if _serving.metric(httpx.get(server.url + "/metrics").text, name, **labels) >= value:
            return
    raise AssertionError(f"{name}{labels} never reached {value}")


def test_a_full_queue_is_a_429_and_a_client_that_leaves_frees_its_slot(made):
    ref = made["ref"]
    server = _serving.Server(
        "--model", made["model"], "--adapter", f"c={made['adapters']['c']}", "--max-batch", "1", "--max-queue", "1"
    )
    try:
        client = server.client()
        prompt, _ = _long_prompt(ref, None)
        running = client.completions.create(model="base", prompt=prompt, max_tokens=LONG, temperature=0, stream=True)
        next(running)  # in the batch (its only slot)
        waiting: list = []
        reader = threading.Thread(
            target=lambda: waiting.append(
                next(
                    iter(
                        client.completions.create(
                            model="c", prompt="hello world", max_tokens=4, temperature=0, stream=True
                        )
                    )
                )
            )
        )
        reader.start()
        _wait_metric(server, "lorakit_waiting_requests", 1)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="base", prompt="the cat", max_tokens=2)
        assert e.value.response.headers["Retry-After"] == "1" and e.value.body["code"] == "queue_full"
        running.close()  # the client goes away mid-stream
        _wait_metric(server, "lorakit_requests_total", 1, adapter="base", finish_reason="cancelled")
        reader.join(timeout=60)
        assert waiting, "the waiting request never got the freed slot"
        generated = _serving.metric(
            httpx.get(server.url + "/metrics").text, "lorakit_generation_tokens_total", adapter="base"
        )
        assert generated < LONG  # the engine stopped generating for the client that left
    finally:
        assert server.stop() == 0, "".join(server.stderr)


def test_sigterm_finishes_the_streams_in_flight_then_exits_0(made):
    ref = made["ref"]
    server = _serving.Server("--model", made["model"], "--drain-timeout", "60")
    prompt, want = _long_prompt(ref, None)
    stream = server.client().completions.create(
        model="base", prompt=prompt, max_tokens=LONG, temperature=0, stream=True
    )
    chunks = [next(stream)]
    server.terminate()
    chunks += list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "length"
    assert server.stop() == 0, "".join(server.stderr)
    assert any("stopped" in line for line in server.stderr)
