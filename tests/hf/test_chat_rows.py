"""lorakit.hf.chat's rows and templates: bad chat rows named by file:line, templates that refuse or rewrite a
conversation, template files, the template saved beside the adapter, Alpaca rows, `lorakit finetune` on chat."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _chat import CHATML_GEN, CONVERSATION, IGNORE, _ids, _jsonl, _labelled_runs  # noqa: E402

pytest.importorskip("transformers")

from lorakit.hf import chat, data  # noqa: E402
from lorakit.hf.data import DataError  # noqa: E402


@pytest.fixture()
def tok():
    return _hf_models.tokenizer(bos=True, chat=True)  # a fresh one: tests set templates on it


NO_SYSTEM = (  # refuses system messages, as Gemma's and Mistral's templates do
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
)
LAST_ONLY = (  # writes earlier assistant turns differently from the last one (as reasoning templates do)
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ 'hello' }}{% else %}{{ m['content'] }}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
)


# -- bad rows ------------------------------------------------------------------------------------------


def test_bad_chat_rows_are_named_by_file_and_line(tmp_path):
    u = {"role": "user", "content": "hi"}
    a = {"role": "assistant", "content": "hello"}
    p = _jsonl(
        tmp_path / "c.jsonl",
        [
            {"messages": [u, a]},  # 1 ok
            {"messages": []},  # 2
            {"messages": "hi"},  # 3
            {"messages": [u, "hello"]},  # 4
            {"messages": [u, {"role": "bot", "content": "x"}]},  # 5
            {"messages": [u, {"role": "assistant", "content": 3}]},  # 6
            {"messages": [u, {"role": "assistant"}]},  # 7
            {"messages": [u]},  # 8
            {"messages": [u, {**a, "train": False}]},  # 9
            {"messages": [u, {**a, "train": "no"}]},  # 10
            {"messages": [{**u, "train": True}, a]},  # 11
            {"messages": [u, {"role": "assistant", "content": " "}]},  # 12
            {"messages": [u, a], "text": "x"},  # 13
            {"messages": [u, {**a, "train": False}, {**a, "train": True}]},  # 14 ok
        ],
    )
    records, _ = data.read_records(p)
    examples, bad = data.validate(p, records, "causal-lm")
    assert [e.line for e in examples] == [1, 14]
    assert [str(b) for b in bad] == [
        f"{p}:{n}: {why}"
        for n, why in [
            (2, "field 'messages' is empty; expected a list of {role, content} objects"),
            (3, "field 'messages' is a str; expected a list of {role, content} objects"),
            (4, "messages[1] is a str; expected an object with role and content"),
            (5, "messages[1] has role 'bot'; expected one of system, user, assistant"),
            (6, "messages[1] content is a int; expected a string"),
            (7, "messages[1] has no 'content'; it has 'role'"),
            (8, "no assistant message; the loss falls on assistant turns only, so there is nothing to learn"),
            (9, "every assistant message has train: false; nothing to learn from this row"),
            (10, "messages[1] has train 'no'; expected true or false"),
            (11, "messages[0] is a user message with 'train'; only assistant turns carry the loss"),
            (12, "messages[1] is an empty assistant message; nothing to learn from it"),
            (13, "has both 'text' and 'messages'; use one form per row"),
        ]
    ]
    _, bad = data.validate(p, records[:1], "seq-cls")
    assert [b.reason for b in bad] == [
        "chat rows ('messages') are for task 'causal-lm'; seq-cls rows are {text, label}"
    ]


def test_templates_that_refuse_or_rewrite_a_conversation_make_bad_rows(tmp_path, tok):
    p = _jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}])
    tok.chat_template = NO_SYSTEM
    with pytest.raises(DataError) as e:
        data.prepare(p, "causal-lm", tok, valid_path=p)
    assert f"{p}:1: the chat template refused this conversation (System role not supported)" in str(e.value)
    tok.chat_template = LAST_ONLY
    with pytest.raises(DataError) as e:
        data.prepare(p, "causal-lm", tok, valid_path=p)
    assert (
        f"{p}:1: the chat template writes messages[2] differently once later messages follow; lorakit cannot "
        "tell which tokens are the assistant's"
    ) in str(e.value)
    assert f"{p}:2:" not in str(e.value)  # one assistant turn: the last, written as given


# -- templates: missing, from a file, saved beside the adapter -----------------------------------------


def test_no_template_is_an_error_naming_chat_template(tmp_path):
    plain = _hf_models.tokenizer(bos=True, chat=True)
    plain.chat_template = None
    p = _jsonl(tmp_path / "c.jsonl", [{"text": "hello world"}, {"messages": CONVERSATION}])
    with pytest.raises(chat.NoChatTemplateError) as e:
        data.prepare(p, "causal-lm", plain, valid_path=p)
    assert str(e.value).startswith(f"{p}:2: chat rows ('messages') need a chat template, and the model's tokenizer")
    assert "pass chat_template= with a Jinja template file" in str(e.value)
    template = tmp_path / "chatml.jinja"
    template.write_text(_hf_models.CHATML, encoding="utf-8")
    prepared = data.prepare(p, "causal-lm", plain, valid_path=p, chat_template=template)
    assert plain.chat_template == _hf_models.CHATML and prepared.chat_template == _hf_models.CHATML
    assert [plain.decode(r) for r in _labelled_runs(prepared.train[1]["input_ids"], prepared.train[1]["labels"])] == [
        "four <|im_end|>",
        "hello world <|im_end|>",
    ]
    assert data.prepare(tmp_path / "c.jsonl", "causal-lm", plain, valid_path=p).chat_template == _hf_models.CHATML
    no_chat = _jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}])
    assert data.prepare(no_chat, "causal-lm", plain, valid_path=no_chat).chat_template is None


def test_bad_template_files_are_refused(tmp_path):
    with pytest.raises(DataError, match="no such chat template file"):
        chat.read_template(tmp_path / "missing.jinja")
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(DataError, match="empty.jinja: the chat template file is empty"):
        chat.read_template(tmp_path / "empty.jinja")
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}\n{{ m['content'] }}\n")
    with pytest.raises(DataError, match=r"broken.jinja:2: not a valid Jinja template \(Unexpected end of template"):
        chat.read_template(tmp_path / "broken.jinja")
    (tmp_path / "gen.jinja").write_text(CHATML_GEN)
    assert chat.read_template(tmp_path / "gen.jinja") == CHATML_GEN  # transformers' {% generation %} tag parses


def test_template_saved_beside_the_adapter_and_loaded_back(tmp_path):
    assert chat.load_template(tmp_path) is None
    path = chat.save_template(tmp_path, _hf_models.CHATML)
    assert path == tmp_path / chat.TEMPLATE_FILE and chat.load_template(tmp_path) == _hf_models.CHATML


def test_render_gives_the_prompt_to_generate_from(tok):
    turns = chat.parse_messages(CONVERSATION[:2] + [{"role": "assistant", "content": "x"}])[:2]
    assert chat.render(tok, turns, add_generation_prompt=True).endswith(
        "<|im_start|>user\nwhat is two plus two ?<|im_end|>\n<|im_start|>assistant\n"
    )


# -- Alpaca rows -----------------------------------------------------------------------------------------


def test_alpaca_rows_become_prompt_and_completion(tmp_path, tok):
    p = _jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "add two and two", "input": "", "output": "four"},
            {"instruction": "name the colour", "input": "the sky", "output": "blue"},
            {"instruction": "greet", "output": "hello"},
            {"instruction": "greet"},
            {"instruction": "", "output": "x"},
            {"instruction": "greet", "input": 3, "output": "x"},
            {"instruction": "greet", "output": "x", "prompt": "p", "completion": "c"},
        ],
    )
    records, _ = data.read_records(p)
    examples, bad = data.validate(p, records, "causal-lm")
    assert [(e.text, e.completion) for e in examples] == [
        (chat.alpaca_prompt("add two and two"), "four"),
        (chat.alpaca_prompt("name the colour", "the sky"), "blue"),
        (chat.alpaca_prompt("greet"), "hello"),
    ]
    assert examples[1].text == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nname the colour\n\n### Input:\nthe sky\n\n### Response:\n"
    )
    assert "### Input" not in examples[0].text
    assert [str(b) for b in bad] == [
        f"{p}:4: missing field 'output'; the row has 'instruction'",
        f"{p}:5: field 'instruction' is empty",
        f"{p}:6: field 'input' is a int ('3'); expected a string",
        f"{p}:7: has both 'prompt'/'completion' and 'instruction'/'output'; use one form per row",
    ]
    [enc], _ = data.encode(examples[2:], tok, "causal-lm", max_length=256)
    prompt = tok(examples[2].text)["input_ids"]
    assert enc["labels"] == [IGNORE] * len(prompt) + _ids(tok, "hello") + [tok.eos_token_id]


# -- the command line --------------------------------------------------------------------------------------


def _lorakit(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *map(str, args)], capture_output=True, text=True, env=env, timeout=180
    )


@pytest.mark.slow
def test_cli_finetunes_on_chat_rows_and_saves_the_template(tmp_path):
    model = _hf_models.save_tiny("llama", tmp_path / "llama", chat_template=_hf_models.CHATML)
    rows = _jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}] * 3)
    r = _lorakit(
        "finetune",
        "--model",
        model,
        "--data",
        rows,
        "--task",
        "causal-lm",
        "--out",
        tmp_path / "a",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--plain",
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert chat.load_template(tmp_path / "a") == _hf_models.CHATML


def test_cli_encoder_as_causal_lm_is_a_model_task_mismatch_before_the_chat_rows(tmp_path, capsys):
    """MiniLM has no chat template, but a chat template would not help: the model/task check comes first."""
    from lorakit.cli import main

    rows = _jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 4)
    assert (
        main(
            [
                "finetune",
                "--model",
                str(_hf_models.minilm_dir()),
                "--data",
                str(rows),
                "--task",
                "causal-lm",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "bert is an encoder (bidirectional attention); it cannot be fine-tuned as a causal-lm" in err
    assert err.rstrip().endswith("use --task seq-cls") and "--chat-template" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_without_a_template_names_the_flag(tmp_path, capsys):
    """In-process (the entry point the subprocess runs): a chat row and no template exit 2 naming --chat-template."""
    from lorakit.cli import main

    bare = _hf_models.save_tiny("llama", tmp_path / "bare", chat_template="")
    rows = _jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 4)
    assert (
        main(
            ["finetune", "--model", str(bare), "--data", str(rows), "--task", "causal-lm", "--out", str(tmp_path / "b")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        f"{rows}:1: chat rows ('messages') need a chat template, and the model's tokenizer has none; "
        "pass --chat-template FILE" in err
    )
    assert "Traceback" not in err and not (tmp_path / "b").exists()
    assert (
        main(
            [
                "finetune",
                "--model",
                str(bare),
                "--data",
                str(rows),
                "--task",
                "causal-lm",
                "--out",
                str(tmp_path / "b"),
                "--chat-template",
                str(tmp_path / "nope.jinja"),
            ]
        )
        == 2
    )
    assert f"{tmp_path / 'nope.jinja'}: no such chat template file" in capsys.readouterr().err
