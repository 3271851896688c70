"""`lorakit serve` with the real all-MiniLM-L6-v2 and a seq-cls adapter from `lorakit finetune`: embeddings as
sentence-transformers computes them, classification as `lorakit predict` does, adapters loaded at run time."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _serving  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

TEXTS = ["the red team beat the blue team", "the blue team won the cup", "a quiet evening at home"]


@pytest.fixture(scope="module")
def encoder(minilm_winners):
    """A server of MiniLM with the seq-cls adapter of a real `lorakit finetune` (tests/conftest.py's, shared with
    tests/cli/test_cli_eval.py), served as `cls`, its directory the adapter root."""
    adapters = minilm_winners["adapter"].parent
    server = _serving.Server(
        "--model",
        _serving._hf_models.minilm_dir(),
        "--adapter",
        f"cls={minilm_winners['adapter']}",
        "--adapter-root",
        adapters,
    )
    yield {"server": server, "client": server.client(), "adapter": minilm_winners["adapter"]}
    assert server.stop() == 0, "".join(server.stderr)


def test_a_seq_cls_adapter_lists_its_lineage(encoder):
    from lorakit.files import provenance

    base, *adapters = encoder["client"].models.list().data
    card = {m.id: m.model_extra for m in adapters}["cls"]
    saved = provenance.read(encoder["adapter"])
    assert card["parent"] == base.id and card["lineage"]["base_match"] is True
    assert card["lineage"]["base_fingerprint"] == provenance.fingerprint_id(saved.base)


def test_base_embeddings_equal_sentence_transformers(encoder):
    import sentence_transformers  # a dev dependency: the reference for MiniLM's sentence embeddings

    got = encoder["client"].embeddings.create(model="base", input=TEXTS)
    want = sentence_transformers.SentenceTransformer(str(_serving._hf_models.minilm_dir()), device="cpu").encode(TEXTS)
    assert [d.index for d in got.data] == [0, 1, 2] and got.usage.prompt_tokens > len(TEXTS)
    torch.testing.assert_close(torch.tensor([d.embedding for d in got.data]), torch.tensor(want), atol=1e-5, rtol=1e-4)


def test_adapter_embeddings_come_from_the_encoder_with_its_lora(encoder):
    from lorakit.hf import models as hf

    got = encoder["client"].embeddings.create(model="cls", input=TEXTS[0])
    model, tok, _ = hf.load_with_adapter(_serving._hf_models.minilm_dir(), encoder["adapter"])
    enc = tok(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        hidden = model.bert(**enc).last_hidden_state  # (1, T, H); one text: no padding to mask
    want = torch.nn.functional.normalize(hidden.mean(1), dim=-1)[0]
    torch.testing.assert_close(torch.tensor(got.data[0].embedding), want, atol=1e-5, rtol=1e-4)
    base = encoder["client"].embeddings.create(model="base", input=TEXTS[0]).data[0].embedding
    assert not torch.allclose(torch.tensor(base), want, atol=1e-4)


def test_classify_answers_labels_and_probabilities_as_predict_does(encoder):
    from lorakit.hf import models as hf
    from lorakit.hf import predict

    r = httpx.post(encoder["server"].url + "/classify", json={"model": "cls", "input": TEXTS})
    assert r.status_code == 200, r.text
    model, tok, _ = hf.load_with_adapter(_serving._hf_models.minilm_dir(), encoder["adapter"])
    want = predict.classify(model, tok, [predict.Request(i, t) for i, t in enumerate(TEXTS)], model.config.id2label)
    got = r.json()["data"]
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert set(g["probabilities"]) == {"red", "blue"} == set(w["probabilities"])
        assert all(abs(g["probabilities"][k] - w["probabilities"][k]) < 1e-5 for k in w["probabilities"])


def test_classify_needs_a_seq_cls_adapter(encoder):
    r = httpx.post(encoder["server"].url + "/classify", json={"model": "base", "input": "x"})
    assert r.status_code == 400 and "seq-cls adapter" in r.json()["error"]["message"]
    r = httpx.post(encoder["server"].url + "/classify", json={"model": "cls", "input": 3})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("input")


def test_seq_cls_adapters_load_and_unload_at_run_time(encoder):
    url = encoder["server"].url
    r = httpx.post(
        url + "/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": encoder["adapter"].name}, timeout=60
    )
    assert r.status_code == 200, r.text
    one = httpx.post(url + "/classify", json={"model": "cls", "input": TEXTS}).json()["data"]
    two = httpx.post(url + "/classify", json={"model": "again", "input": TEXTS}).json()["data"]
    assert one == two
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "again"}).json()["status"] == "unloaded"
    assert httpx.post(url + "/classify", json={"model": "again", "input": "x"}).status_code == 404
    assert (
        _serving.metric(httpx.get(url + "/metrics").text, "lorakit_requests_total", adapter="cls", finish_reason="stop")
        >= 1
    )


def test_labels_that_are_not_0_to_n_are_refused_at_load(encoder):
    import shutil

    bad = encoder["adapter"].parent / "gaps"
    shutil.copytree(encoder["adapter"], bad)
    task = json.loads((bad / "lorakit_task.json").read_text())
    task["id2label"] = {"0": "red", "5": "blue"}
    (bad / "lorakit_task.json").write_text(json.dumps(task))
    r = httpx.post(
        encoder["server"].url + "/v1/load_lora_adapter", json={"lora_name": "gaps", "lora_path": "gaps"}, timeout=60
    )
    assert r.status_code == 400 and "id2label" in r.json()["error"]["message"], r.text
    assert httpx.post(encoder["server"].url + "/classify", json={"model": "gaps", "input": "x"}).status_code == 404


def test_dimensions_other_than_the_models_are_refused(encoder):
    client = encoder["client"]
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="base", input="x", dimensions=64)
    assert e.value.body["param"] == "dimensions" and "384" in e.value.body["message"]
    assert len(client.embeddings.create(model="base", input="x", dimensions=384).data[0].embedding) == 384


def test_generation_routes_answer_that_this_is_an_encoder(encoder):
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(encoder["server"].url + path, json={"model": "base", "prompt": "x"})
        error = r.json()["error"]
        assert r.status_code == 404 and "encoder" in error["message"] and "POST /v1/embeddings" in error["message"]


def test_schemathesis_finds_no_server_error_and_no_schema_violation(encoder):
    schema = httpx.get(encoder["server"].url + "/openapi.json").json()
    operations = sorted(f"{m.upper()} {p}" for p, ops in schema["paths"].items() for m in ops)
    assert "POST /v1/embeddings" in operations and "POST /classify" in operations
    cases, out = _serving.fuzz(encoder["server"], max_examples=15, models=["base", "cls"])
    print(f"schemathesis: {cases} generated test cases over {len(operations)} operations")
    assert cases >= 50, out[-3000:]
