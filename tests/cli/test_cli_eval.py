"""`lorakit eval` and `lorakit predict` in real subprocesses (and in-process for the quick error cases).

The numbers are checked against the things they must agree with: finetune's own validation report
(MiniLM, seq-cls), a naive per-row loss reference (causal-lm), one-at-a-time generation and `lorakit generate`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _cli import in_process  # noqa: E402

transformers = pytest.importorskip("transformers")

from lorakit.cli import main  # noqa: E402
from lorakit.hf import data  # noqa: E402
from lorakit.hf import evaluate as ev  # noqa: E402
from lorakit.hf import models as hf  # noqa: E402
from lorakit.hf import predict as pr  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

transformers.utils.logging.set_verbosity_error()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
QUESTION = "question : what is two plus two ? answer :"


def lorakit(*args, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
        input=stdin,
    )


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _causal_rows() -> list[dict]:
    qa = [(QUESTION, "four"), ("question : what colour is the sky ? answer :", "blue")]
    return [{"prompt": q, "completion": a} for q, a in qa] * 4 + [{"text": s} for s in _hf_models.SENTENCES] * 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: _hf_models.save_tiny(kind, root / kind) for kind in ("llama", "gpt2")}


@pytest.fixture(scope="module")
def causal(causal_run) -> dict[str, Path]:
    """A tiny llama fine-tuned briefly on prompt/completion and text rows: the real `lorakit finetune` of
    tests/cli/conftest.py, run once for this module and test_cli.py."""
    return {"model": causal_run["model"], "adapter": causal_run["adapter"], "rows": causal_run["rows"]}


@pytest.fixture(scope="module")
def minilm(minilm_winners) -> dict:
    """MiniLM with a seq-cls LoRA adapter from `lorakit finetune` (a small, quick run), and its report: the run of
    tests/conftest.py, shared with tests/serve/test_serve_encoder.py."""
    return minilm_winners


# -- seq-cls: eval reproduces finetune's validation; predict agrees with eval ---------------------------


def test_eval_reproduces_finetune_validation_accuracy(minilm, capsys):
    after = minilm["report"]["after"]
    assert f"valid_accuracy={after['accuracy']:.4f}" in minilm["stdout"]
    # another batch size than training's 16: padding must not change what is scored
    r = lorakit(
        "eval",
        "--model",
        minilm["model"],
        "--adapter",
        minilm["adapter"],
        "--data",
        minilm["valid"],
        "--json",
        "--batch-size",
        "7",
    )
    assert r.returncode == 0, r.stderr
    assert "evaluating adapter" in r.stderr and "tokenizing: 40/40 rows" in r.stderr  # progress on stderr
    report = json.loads(r.stdout)  # exactly one JSON object on stdout
    got = report["adapters"]["adapter"]
    print(
        f"\nfinetune valid accuracy {after['accuracy']:.4f} loss {after['loss']:.6f}; "
        f"eval accuracy {got['accuracy']:.4f} loss {got['loss']:.6f}"
    )
    assert got["accuracy"] == pytest.approx(after["accuracy"], abs=1e-12)
    assert got["loss"] == pytest.approx(after["loss"], abs=1e-5)  # the trained head, not a random one
    assert report["base"] is None and "not scored" in report["note"]
    assert got["labels"] == ["blue", "red"] and report["max_length"] == 32  # as trained (lorakit_task.json)
    confusion = torch.tensor(got["confusion"])
    assert confusion.sum() == 40 and confusion.trace() / 40 == pytest.approx(got["accuracy"])
    truth = [json.loads(line)["label"] for line in minilm["valid"].read_text().splitlines()]
    assert confusion.sum(dim=1).tolist() == [truth.count("blue"), truth.count("red")]  # rows are the true labels

    assert (
        main(
            [
                "eval",
                "--model",
                str(minilm["model"]),
                "--adapter",
                f"mine={minilm['adapter']}",
                "--data",
                str(minilm["valid"]),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out  # piped: plain text
    assert "confusion matrix of mine (rows: true label, columns: predicted)" in table and "not scored" in table
    assert f"{got['accuracy']:.4f}" in table and "\x1b[" not in table


def test_predict_seq_cls_probabilities_and_argmax_match_eval(minilm):
    r = lorakit(
        "predict",
        "--model",
        minilm["model"],
        "--adapter",
        minilm["adapter"],
        "--input",
        minilm["valid"],
        "--batch-size",
        "16",
    )
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    truth = [json.loads(line)["label"] for line in minilm["valid"].read_text().splitlines()]
    assert [o["line"] for o in out] == list(range(1, 41))
    for o in out:
        assert list(o["probabilities"]) == ["blue", "red"]  # the adapter's names, in id order
        assert sum(o["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert o["label"] == max(o["probabilities"], key=o["probabilities"].get)
    report = ev.evaluate(minilm["model"], {"a": minilm["adapter"]}, minilm["valid"], batch_size=5)
    names = report["adapters"]["a"]["labels"]
    confusion = [[0, 0], [0, 0]]
    for o, t in zip(out, truth, strict=True):
        confusion[names.index(t)][names.index(o["label"])] += 1
    assert confusion == report["adapters"]["a"]["confusion"]


# -- causal-lm: token-weighted loss, the adapter beats the base; batched generation = one at a time -------


def _naive_loss(model, rows) -> float:
    """Token-weighted mean loss, one row at a time with transformers' own loss: sum(loss_i * n_i) / sum(n_i)."""
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for row in rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            tokens += n
    return total / tokens


def test_eval_causal_lm_adapter_beats_base_token_weighted(causal):
    r = lorakit(
        "eval",
        "--model",
        causal["model"],
        "--adapter",
        f"a={causal['adapter']}",
        "--adapter",
        f"b={causal['adapter']}",
        "--data",
        causal["rows"],
        "--json",
        "--batch-size",
        "3",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    base, a, b = report["base"], report["adapters"]["a"], report["adapters"]["b"]
    print(f"\ncausal-lm eval: base loss {base['loss']:.4f}, adapter loss {a['loss']:.4f}")
    assert a["loss"] < base["loss"] and a == b  # one shared base, switched by name
    assert a["perplexity"] == pytest.approx(torch.tensor(a["loss"]).exp().item())

    tok = hf.load_tokenizer(causal["model"])
    records, _ = data.read_records(causal["rows"])
    rows, _ = data.encode(data.validate(causal["rows"], records, "causal-lm")[0], tok, "causal-lm", 256)
    assert base["tokens"] == sum(sum(x != -100 for x in row["labels"][1:]) for row in rows)  # prompts unscored
    assert base["loss"] == pytest.approx(_naive_loss(hf.load_model(causal["model"], "causal-lm"), rows), abs=1e-5)
    tuned, _, _ = hf.load_with_adapter(causal["model"], causal["adapter"])
    assert a["loss"] == pytest.approx(_naive_loss(tuned, rows), abs=1e-5)


def test_predict_causal_lm_batched_equals_one_by_one_and_generate(causal, tmp_path, capsys):
    """The batched run is the real process (its exit 0 and stdout); batch size 1 and `generate` are the same entry
    point called in process (`in_process`), each compared with its stdout: what they prove is the output, and two
    more process starts would only load the same model again."""
    template = tmp_path / "chat.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}answer :{% endif %}"
    )
    rows = [
        {"prompt": QUESTION, "id": "q1"},
        {"text": "the cat"},
        {"text": "the quick brown fox jumps over"},
        {"messages": [{"role": "user", "content": "question : what is two plus two ?"}]},
        {"prompt": "question : what colour is the sky ? answer :", "id": 7},
    ]
    inp = _write_jsonl(tmp_path / "in.jsonl", rows)
    common = [
        "predict",
        "--model",
        causal["model"],
        "--adapter",
        causal["adapter"],
        "--input",
        inp,
        "--chat-template",
        template,
        "--max-new-tokens",
        "6",
    ]
    batched = lorakit(*common, "--batch-size", "4")
    status, single, err = in_process(capsys, *common, "--batch-size", "1")
    assert batched.returncode == 0 and status == 0, batched.stderr + err
    assert batched.stdout == single
    out = [json.loads(line) for line in batched.stdout.splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3, 4, 5] and out[0]["id"] == "q1" and out[4]["id"] == 7
    assert all(isinstance(o["completion"], str) and o["completion"].strip() for o in out)
    assert out[0]["completion"].split()[0] == "four" and out[3]["completion"].split()[0] == "four"  # chat rendered

    status, generated, err = in_process(
        capsys,
        "generate",
        "--model",
        causal["model"],
        "--adapter",
        causal["adapter"],
        "--prompt",
        QUESTION,
        "--max-new-tokens",
        "6",
    )
    assert status == 0, err
    assert generated == out[0]["completion"] + "\n"  # the completion alone: no prompt echo


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_greedy_equals_one_at_a_time(tiny, kind):
    model, tok = hf.load(tiny[kind], "causal-lm")
    prompts = ["hello world", "the quick brown fox jumps over the lazy dog", "a bird", QUESTION, "we like green tea"]
    requests = [pr.Request(i + 1, p) for i, p in enumerate(prompts)]
    batched = pr.complete(model, tok, requests, max_new_tokens=8, batch_size=3)
    assert batched == [hf.generate(model, tok, p, max_new_tokens=8) for p in prompts]
    assert pr.complete(model, tok, requests, max_new_tokens=8, batch_size=1) == batched


# -- bad inputs: exit 2 with reasons, nothing printed on stdout --------------------------------------------


def test_bad_inputs_exit_2_with_reasons(causal, minilm, tmp_path, capsys):
    def run(*args) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        got = capsys.readouterr()
        return code, got.out, got.err

    model, adapter = causal["model"], causal["adapter"]
    code, out, err = run("eval", "--model", model, "--adapter", adapter, "--data", tmp_path / "nope.jsonl")
    assert code == 2 and "nope.jsonl: no such file" in err and not out

    bad = _write_jsonl(tmp_path / "bad.jsonl", _causal_rows()[:4] + ["{oops", {"text": ""}])
    code, out, err = run("eval", "--model", model, "--adapter", adapter, "--data", bad)
    assert code == 2 and "2 bad row(s)" in err and "--skip-bad-rows to score without them" in err and not out
    assert "train" not in err  # eval trains nothing
    assert f"{bad}:5: not valid JSON" in err and f"{bad}:6: field 'text' is empty" in err
    code, out, err = run("eval", "--model", model, "--adapter", adapter, "--data", bad, "--skip-bad-rows", "--json")
    assert code == 0 and json.loads(out)["skipped_bad_rows"][0].startswith(f"{bad}:5:") and "skipping 2" in err

    code, out, err = run("eval", "--model", model, "--adapter", tmp_path / "no-adapter", "--data", causal["rows"])
    assert code == 2 and "no-adapter" in err and not out
    code, out, err = run(
        "eval",
        "--model",
        model,
        "--adapter",
        f"lm={adapter}",
        "--adapter",
        f"cls={minilm['adapter']}",
        "--data",
        causal["rows"],
    )
    assert code == 2 and "different tasks" in err and "lm=" in err and "cls=" in err and "seq-cls" in err
    unknown = _write_jsonl(tmp_path / "labels.jsonl", [{"text": "the red team won", "label": "green"}])
    code, out, err = run("eval", "--model", minilm["model"], "--adapter", minilm["adapter"], "--data", unknown)
    assert code == 2 and f"{unknown}:1: unknown label 'green'" in err
    code, out, err = run("eval", "--model", model, "--task", "seq-cls", "--data", causal["rows"])
    assert code == 2 and "seq-cls needs an adapter" in err

    code, out, err = run("predict", "--model", model, "--input", tmp_path / "missing.jsonl")
    assert code == 2 and "missing.jsonl: no such file" in err and not out
    rows = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": QUESTION}, {"texts": "x"}, "[1]"])
    code, out, err = run("predict", "--model", model, "--input", rows)
    assert code == 2 and not out  # checked before any output
    assert f"{rows}:2: expected exactly one of 'text', 'prompt', 'messages'" in err and f"{rows}:3:" in err
    code, out, err = run("predict", "--model", model, "--input", rows, "--skip-bad-rows", "--max-new-tokens", "2")
    assert code == 0 and [json.loads(line).get("error") is None for line in out.splitlines()] == [True, False, False]
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    code, out, err = run("predict", "--model", model, "--input", chat)
    assert code == 2 and "--chat-template" in err and f"{chat}: rows with 'messages' (line 1)" in err

    r = lorakit("predict", "--model", model, "--adapter", minilm["adapter"], stdin='{"prompt": "x"}\n')
    assert r.returncode == 2 and "<stdin>:1: a seq-cls row needs 'text'" in r.stderr and not r.stdout
    assert "Traceback" not in r.stderr
