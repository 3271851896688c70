"""Answer metrics from the command line: `lorakit eval --metric` (table and --json), `lorakit finetune
--eval-metric` (metrics.jsonl rows with the metric and sample completions), and their refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _cli import _write_jsonl  # noqa: E402

transformers = pytest.importorskip("transformers")

from lorakit.cli import main  # noqa: E402

MAX_NEW = 4
QA = [("question : what is two plus two ? answer :", "four"), ("question : what colour is the sky ? answer :", "blue")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _hf_models.save_tiny("llama", tmp_path_factory.mktemp("metric") / "llama", _hf_models.CHATML)


def greedy(model, tok, text: str, *, chat: bool = False) -> str:
    """transformers' own greedy generate, one prompt at a time: the oracle of lorakit's batched decoder."""
    ids = tok(text, add_special_tokens=not chat, return_tensors="pt")["input_ids"]
    out = model.generate(
        ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_eval_metric_in_the_table_and_in_json(tmp_path, model_dir, capsys):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    chat = [{"role": "user", "content": "the dog ran in the park"}]
    prompt_answer = greedy(model, tok, "the cat sat on the mat")
    chat_prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    chat_answer = greedy(model, tok, chat_prompt, chat=True)
    rows = [
        {"prompt": "the cat sat on the mat", "completion": prompt_answer},  # right
        {"messages": [*chat, {"role": "assistant", "content": chat_answer}]},  # right
        {"prompt": "the cat sat on the mat", "completion": f"{prompt_answer} zzz"},  # wrong
        {"prompt": "the cat sat on the mat", "completion": prompt_answer.split()[-1]},  # contained, not equal
    ]
    assert prompt_answer.split()[-1] != prompt_answer.strip()
    data = _write_jsonl(tmp_path / "valid.jsonl", rows)
    base = ["eval", "--model", str(model_dir), "--data", str(data), "--max-new-tokens", str(MAX_NEW)]
    assert main([*base, "--metric", "exact_match,contains", "--metric", "json_valid", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"] == ["exact_match", "contains", "json_valid"]
    scores = {k: report["base"][k] for k in report["metrics"]}
    assert scores == {"exact_match": 0.5, "contains": 0.75, "json_valid": 0.0}
    assert main([*base, "--metric", "exact_match", "--metric", "regex:^.*$"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["model", "loss", "perplexity", "tokens", "exact_match", "regex:^.*$"]
    assert table[3].split()[0] == "base" and table[3].split()[-2:] == ["0.5000", "1.0000"]


@pytest.mark.parametrize(
    ("flags", "rows", "message"),
    [
        (["--metric", "exact"], None, "unknown metric 'exact'; expected one of exact_match, contains, regex:PATTERN"),
        (["--metric", "regex:(a"], None, "metric 'regex:(a': the pattern '(a' is not a valid regex (missing )"),
        (["--metric", "exact_match"], [{"text": "hello world"}], "valid.jsonl:1: a 'text' row has no prompt and"),
        (
            ["--metric", "json_valid,contains"],
            [{"prompt": "a", "completion": "b"}, {"messages": [{"role": "user", "content": "hello"}] * 1}],
            "valid.jsonl:2: no reference answer",
        ),
    ],
)
def test_eval_metric_refusals_name_the_metric_or_the_row(tmp_path, model_dir, capsys, flags, rows, message):
    if rows and "messages" in rows[-1]:  # a conversation that ends on the user: valid data, no reference answer
        rows[-1]["messages"] = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "good"},
        ]
    data = _write_jsonl(tmp_path / "valid.jsonl", rows or [{"prompt": "a", "completion": "b"}])
    assert main(["eval", "--model", str(model_dir), "--data", str(data), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_finetune_eval_metric_refusals(tmp_path, model_dir, capsys):
    data = _write_jsonl(tmp_path / "train.jsonl", [{"text": "hello world", "label": "a"}] * 4)
    base = ["finetune", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "out")]
    assert main([*base, "--task", "seq-cls", "--eval-metric", "exact_match"]) == 2
    assert "answer metrics (exact_match) score generated text: they need task causal-lm, not seq-cls" in (
        capsys.readouterr().err
    )
    assert main([*base, "--task", "causal-lm", "--eval-metric", "exact_match,nope"]) == 2
    assert "unknown metric 'nope'" in capsys.readouterr().err
    directory = tmp_path / "rows"
    directory.mkdir()
    _write_jsonl(directory / "a.jsonl", [{"prompt": q, "completion": a} for q, a in QA] * 4)
    dir_flags = ["--data", str(directory), "--task", "causal-lm", "--eval-metric", "exact_match"]
    assert main(["finetune", "--model", str(model_dir), "--out", str(tmp_path / "o2"), *dir_flags]) == 2
    assert "held out as it is read, so they cannot be listed for answer metrics; pass --valid FILE" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "o2").exists()


def _finetune(model_dir: Path, tmp_path: Path, out: str, *extra: str) -> list[dict]:
    train = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": q, "completion": a} for q, a in QA] * 4)
    valid = _write_jsonl(tmp_path / "valid.jsonl", [{"prompt": q, "completion": a} for q, a in QA] * 2)
    flags = ["--model", str(model_dir), "--data", str(train), "--valid", str(valid), "--task", "causal-lm"]
    flags += ["--out", str(tmp_path / out), "--rank", "4", "--epochs", "2", "--lr", "1e-2", "--batch-size", "4"]
    assert main(["finetune", *flags, "--eval-every", "1", "--device", "cpu", "--plain", *extra]) == 0
    lines = (tmp_path / out / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow  # two whole fine-tuning runs in process
def test_finetune_eval_metric_logs_the_metric_and_sample_completions(tmp_path, model_dir, capsys):
    flags = ["--eval-metric", "exact_match", "--eval-metric", "contains", "--eval-max-new-tokens", str(MAX_NEW)]
    rows = _finetune(model_dir, tmp_path, "scored", *flags, "--eval-metric-rows", "2")
    evals = [r for r in rows if r["kind"] in ("eval", "epoch")]
    assert [r["kind"] for r in evals] == ["eval", "epoch", "eval", "epoch"]
    for r in evals:
        assert set(r["samples"][0]) == {"row", "prompt", "reference", "generation", "scores"}
        assert len(r["samples"]) == 2  # --eval-metric-rows 2 caps the rows generated (and so the samples)
        assert [s["row"] for s in r["samples"]] == [f"{tmp_path / 'valid.jsonl'}:{i}" for i in (1, 2)]
        assert [(s["prompt"], s["reference"]) for s in r["samples"]] == list(QA)
        for s in r["samples"]:
            assert s["scores"] == {"exact_match": float(s["generation"].strip() == s["reference"]),
                                   "contains": float(s["reference"] in s["generation"])}  # fmt: skip
        assert r["valid_exact_match"] == sum(s["scores"]["exact_match"] for s in r["samples"]) / 2
    report = json.loads((tmp_path / "scored" / "run" / "finetune_report.json").read_text())
    assert report["after"]["exact_match"] == evals[-1]["valid_exact_match"]
    assert "valid_exact_match=" in capsys.readouterr().out  # the before/after lines
    # the oracle: the final adapter's greedy answers, generated by transformers one prompt at a time
    import lorakit as lk

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = lk.load_adapters(transformers.AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "scored").eval()
    assert [s["generation"] for s in evals[-1]["samples"]] == [greedy(model, tok, q) for q, _ in QA]
    # generating at every evaluation changes nothing the run trains or validates
    plain = _finetune(model_dir, tmp_path, "plain")
    keys = ("kind", "step", "loss", "train_loss", "valid_loss")
    assert [{k: r.get(k) for k in keys} for r in plain] == [{k: r.get(k) for k in keys} for r in rows]
    assert "samples" not in plain[-1] and "valid_exact_match" not in plain[-1]
