"""Answer rows (each row form's prompt and reference), the validation rows a run answers, and `evaluate` with
answer metrics on a tiny random model whose greedy answers transformers' own `generate` computes (the oracle)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

transformers = pytest.importorskip("transformers")

from lorakit.hf import answers, data  # noqa: E402
from lorakit.hf import evaluate as ev  # noqa: E402
from lorakit.hf.answer_metrics import MetricError, parse_metrics  # noqa: E402
from lorakit.hf.examples import alpaca_prompt, validate  # noqa: E402

MAX_NEW = 5
PROMPTS = ["the cat sat on the mat", "we like green tea", "a bird sang a song"]  # short and long: left padding
CHATS = [[{"role": "user", "content": "the dog ran in the park"}], [{"role": "user", "content": "hello world"}]]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok():
    return _hf_models.tokenizer(bos=True, chat=True)


def _rows(tok, rows: list, metrics=("json_valid",)) -> list[answers.AnswerRow]:
    examples, bad = validate("f.jsonl", enumerate(rows, start=1), "causal-lm")
    assert not bad, bad
    return answers.answer_rows(examples, tok, parse_metrics(metrics))


def test_each_row_form_gives_its_prompt_and_reference(tok):
    chat = [{"role": "system", "content": "you are a helpful bot"}, {"role": "user", "content": "good morning"}]
    rows = _rows(
        tok,
        [
            {"prompt": "question : what is two plus two ? answer :", "completion": "four"},
            {"instruction": "what colour is the sky ?", "input": "hello", "output": "blue"},
            {"messages": [*chat, {"role": "assistant", "content": "hello world"}]},
            {"messages": [*chat, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "good"}]},
        ],
    )
    assert [(r.where, r.prompt, r.reference, r.chat) for r in rows[:2]] == [
        ("f.jsonl:1", "question : what is two plus two ? answer :", "four", False),
        ("f.jsonl:2", alpaca_prompt("what colour is the sky ?", "hello"), "blue", False),
    ]
    # a chat: the turns before its last (assistant) message, through the template with the assistant's header
    assert rows[2].prompt == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (rows[2].reference, rows[2].chat) == ("hello world", True)
    assert rows[2].prompt.endswith("<|im_start|>assistant\n")
    assert rows[3].reference is None  # ends on the user: all prompt, nothing to compare with


def test_rows_that_cannot_be_scored_are_named(tok):
    ends_on_user = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 1}
    ends_on_user["messages"].append({"role": "user", "content": "good"})
    with pytest.raises(MetricError, match=r"f\.jsonl:2: no reference answer .*exact_match"):
        _rows(tok, [{"prompt": "a", "completion": "b"}, ends_on_user], metrics=["json_valid", "exact_match"])
    assert _rows(tok, [ends_on_user], metrics=["json_valid", "regex:x"])[0].reference is None  # no reference needed
    with pytest.raises(MetricError, match=r"f\.jsonl:2: a 'text' row has no prompt and reference answer"):
        _rows(tok, [{"prompt": "a", "completion": "b"}, {"text": "hello world"}])
    with pytest.raises(MetricError, match=r"f\.jsonl:1: the prompt is empty"):
        _rows(tok, [{"prompt": " ", "completion": "b"}])
    with pytest.raises(MetricError, match="need task causal-lm, not seq-cls"):
        answers.check_task(parse_metrics(["exact_match"]), "seq-cls")


def test_a_run_answers_the_rows_it_validates_on(tmp_path, tok):
    """Without a validation file, the rows data.prepare holds out (the oracle: their token ids), in order,
    the bad rows (skipped) left out, at most `limit`."""
    words = " ".join(_hf_models.SENTENCES).split()
    rows = [{"prompt": " ".join(words[i : i + 3]), "completion": words[i + 3]} for i in range(30)]
    rows[7] = {"prompt": "x"}  # a bad row
    path = _jsonl(tmp_path / "train.jsonl", rows)
    prepared = data.prepare(path, "causal-lm", tok, valid_fraction=0.3, seed=3, skip_bad_rows=True)
    metrics = parse_metrics(["exact_match"])
    options = {"valid_fraction": 0.3, "seed": 3, "bad_rows": prepared.bad_rows}
    found = answers.validation_answer_rows(path, None, tok, metrics, limit=100, **options)
    assert len(found) == len(prepared.valid) == 9
    for r, enc in zip(found, prepared.valid, strict=True):
        ids = tok(r.prompt)["input_ids"] + tok(r.reference, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids == enc["input_ids"], r.where
    assert answers.validation_answer_rows(path, None, tok, metrics, limit=4, **options) == found[:4]
    valid = _jsonl(tmp_path / "valid.jsonl", rows[:3])
    assert [r.line for r in answers.validation_answer_rows(path, valid, tok, metrics, limit=2, **options)] == [1, 2]
    directory = tmp_path / "dir"
    directory.mkdir()
    _jsonl(directory / "a.jsonl", rows)
    with pytest.raises(MetricError, match="held out as it is read") as e:
        answers.validation_answer_rows(directory, None, tok, metrics, limit=4, **options)
    assert e.value.param == "valid_path"


# -- evaluate with answer metrics: the oracle is transformers' own greedy generate, one prompt at a time -------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _hf_models.save_tiny("llama", tmp_path_factory.mktemp("answers") / "llama", _hf_models.CHATML)


def greedy(model, tok, text: str, chat: bool) -> str:
    ids = tok(text, add_special_tokens=not chat, return_tensors="pt")["input_ids"]
    out = model.generate(
        ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def references(model_dir) -> list[tuple[dict, str]]:
    """(row without its answer, the base's greedy answer) for prompt rows and chat rows."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out: list[tuple[dict, str]] = [({"prompt": p}, greedy(model, tok, p, False)) for p in PROMPTS]
    for chat in CHATS:
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        out.append(({"messages": chat}, greedy(model, tok, text, True)))
    assert all(answer.strip() for _, answer in out), out  # a row's answer must not be empty
    return out


def with_answers(references, change=lambda a: a) -> list[dict]:
    rows = []
    for row, answer in references:
        if "prompt" in row:
            rows.append({**row, "completion": change(answer)})
        else:
            rows.append({"messages": [*row["messages"], {"role": "assistant", "content": change(answer)}]})
    return rows


def test_evaluate_scores_greedy_answers_against_the_references(tmp_path, model_dir, references):
    right = _jsonl(tmp_path / "right.jsonl", with_answers(references))
    wrong = _jsonl(tmp_path / "wrong.jsonl", with_answers(references, lambda a: f"zzz {a}"))
    metrics = ["exact_match,contains", r"regex:^\S", "json_valid"]
    options = {"metrics": metrics, "max_new_tokens": MAX_NEW, "batch_size": 2}
    report = ev.evaluate(model_dir, {}, right, **options)
    assert report["metrics"] == ["exact_match", "contains", r"regex:^\S", "json_valid"]
    assert report["max_new_tokens"] == MAX_NEW
    scores = {k: report["base"][k] for k in report["metrics"]}
    assert scores == {"exact_match": 1.0, "contains": 1.0, r"regex:^\S": 1.0, "json_valid": 0.0}
    report = ev.evaluate(model_dir, {}, wrong, **options)
    assert (report["base"]["exact_match"], report["base"]["contains"]) == (0.0, 0.0)
