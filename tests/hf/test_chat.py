"""lorakit.hf.chat: chat rows validated by file:line, loss on assistant turns only (checked token by token and
against transformers' own {% generation %} mask), templates from a file, Alpaca rows, `lorakit finetune` on chat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

pytest.importorskip("transformers")

from lorakit.hf import chat, data  # noqa: E402
from lorakit.hf.data import DataError  # noqa: E402

IGNORE = -100
CHATML_GEN = (  # CHATML with transformers' {% generation %} markers around what the assistant must emit
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2 = (  # Llama-2 style: the system folded into the first user turn, no generation prompt, EOS ends a turn
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '<<SYS>> ' + m['content'] + ' <</SYS>> ' }}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
NO_SYSTEM = (  # refuses system messages, as Gemma's and Mistral's templates do
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
)
LAST_ONLY = (  # writes earlier assistant turns differently from the last one (as reasoning templates do)
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ 'hello' }}{% else %}{{ m['content'] }}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
)

CONVERSATION = [
    {"role": "system", "content": "you are a helpful bot"},
    {"role": "user", "content": "what is two plus two ?"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "what colour is the sky ?"},
    {"role": "assistant", "content": "the sky is blue", "train": False},
    {"role": "user", "content": "good morning"},
    {"role": "assistant", "content": "hello world"},
]


@pytest.fixture()
def tok():
    return _hf_models.tokenizer(bos=True, chat=True)  # a fresh one: tests set templates on it


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of positions whose label is the token itself (everything else must be -100)."""
    runs: list[list[int]] = []
    for i, (t, y) in enumerate(zip(ids, labels, strict=True)):
        assert y in (t, IGNORE), f"position {i}: label {y} is neither the token {t} nor -100"
        if y == t:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
    return [[ids[i] for i in run] for run in runs]


# -- the assistant mask, token by token ----------------------------------------------------------------


def test_chatml_mask_is_the_trained_assistant_contents_and_their_end_token(tok):
    turns = chat.parse_messages(CONVERSATION)
    ids, labels = chat.encode_chat(tok, turns, 512, "f:1")
    # the reference, built from the template's structure: <|im_start|> role content... <|im_end|> per message
    want_ids, want_labels = [], []
    for m in CONVERSATION:
        head, body = [tok.convert_tokens_to_ids("<|im_start|>"), *_ids(tok, m["role"])], _ids(tok, m["content"])
        end = [tok.convert_tokens_to_ids("<|im_end|>")]
        want_ids += head + body + end
        trained = m["role"] == "assistant" and m.get("train", True)
        want_labels += [IGNORE] * len(head) + (body + end if trained else [IGNORE] * (len(body) + 1))
    assert ids == want_ids and labels == want_labels
    runs = _labelled_runs(ids, labels)
    assert [tok.decode(r) for r in runs] == ["four <|im_end|>", "hello world <|im_end|>"]  # not 'the sky is blue'
    assert "assistant" not in " ".join(tok.decode(r) for r in runs)  # never the role header


def test_mask_matches_transformers_generation_mask(tok):
    """A template with {% generation %} markers: transformers' own assistant mask is the oracle."""
    tok.chat_template = CHATML_GEN
    messages = [{k: v for k, v in m.items() if k != "train"} for m in CONVERSATION]  # HF has no per-turn opt-out
    ours, labels = chat.encode_chat(tok, chat.parse_messages(messages), 512, "f:1")
    theirs = tok.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    assert ours == theirs["input_ids"]
    assert [int(y != IGNORE) for y in labels] == theirs["assistant_masks"]
    assert sum(theirs["assistant_masks"]) == len(_ids(tok, "four the sky is blue hello world")) + 3


# Templates with transformers' {% generation %} markers, for byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2 style)
LLAMA3_GEN = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
VICUNA_GEN = (  # the generation prompt ends in a space: the answer's first token starts with it ('Ġfour')
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + ' ' }}"
    "{% elif m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}"
)
VICUNA_NO_SPACE_GEN = (  # the generation prompt ends at the colon: the space is the answer's to write
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT:' }}{% generation %}{{ ' ' + m['content'] + eos_token }}{% endgeneration %}"
    "{{ ' ' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
BPE_SPECIALS = [
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
ANSWERS = ["four", "Zebra", "blue", "hello world", "Xylophones hum", "the dog ran", "Quokka", "good morning"]


def _byte_level_bpe(trim_offsets: bool):
    """A byte-level BPE tokenizer trained here on the test sentences (GPT-2 / Llama-3 / Qwen2's model family):
    'Ġfour' is one token, while 'Zebra' starts with a lone 'Ġ' token (no merge learned for it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    corpus = _hf_models.SENTENCES + _hf_models.CHAT_WORDS + ["USER: hello ASSISTANT: four"]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=BPE_SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="</s>")


@pytest.mark.parametrize("trim_offsets", [False, True])
@pytest.mark.parametrize(
    "template",
    [CHATML_GEN, LLAMA3_GEN, VICUNA_GEN, VICUNA_NO_SPACE_GEN],
    ids=["chatml", "llama3", "vicuna", "vicuna-no-space"],
)
def test_byte_level_mask_matches_transformers_generation_mask(template, trim_offsets):
    """transformers' `return_assistant_tokens_mask` is the oracle: a token is the assistant's when its characters
    overlap the {% generation %} span. So with a prompt ending in 'ASSISTANT: ' the answer's first token 'Ġfour'
    (which starts with the prompt's space) is labelled, and with trimmed offsets a lone 'Ġ' before 'Zebra' is not."""
    tok = _byte_level_bpe(trim_offsets)
    tok.chat_template = template
    for answer in ANSWERS:
        messages = [
            {"role": "user", "content": "what is two plus two ?"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "good morning"},
            {"role": "assistant", "content": "hello"},
        ]
        ours, labels = chat.encode_chat(tok, chat.parse_messages(messages), 512, "f:1")
        theirs = tok.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
        assert ours == theirs["input_ids"]
        assert [int(y != IGNORE) for y in labels] == theirs["assistant_masks"], (
            answer,
            tok.convert_ids_to_tokens(ours),
        )


def test_template_without_generation_prompt_or_special_end_token(tok):
    """Llama-2 style: add_generation_prompt is ignored, the turn ends with EOS; the header stays out."""
    tok.chat_template = LLAMA2
    turns = chat.parse_messages(CONVERSATION[:5] + CONVERSATION[5:])
    ids, labels = chat.encode_chat(tok, turns, 512, "f:1")
    assert ids[0] == tok.bos_token_id
    eos = tok.decode([tok.eos_token_id])
    assert [tok.decode(r) for r in _labelled_runs(ids, labels)] == [f"four {eos}", f"hello world {eos}"]


def test_truncation_keeps_the_mask_aligned(tok):
    turns = chat.parse_messages(CONVERSATION)
    ids, labels = chat.encode_chat(tok, turns, 512, "f:1")
    first = next(i for i, y in enumerate(labels) if y != IGNORE)  # "four", after system, user and the header
    assert first == 19 and tok.decode(ids[first : first + 1]) == "four"
    for n in (3, first, first + 1, first + 2, len(ids) - 1):
        short_ids, short_labels = chat.encode_chat(tok, turns, n, "f:1")
        assert short_ids == ids[:n] and short_labels == labels[:n]
    # cut before the first answer: nothing is left to learn
    rows = data.encode([data.Example("c.jsonl", 4, "", messages=turns)], tok, "causal-lm", max_length=first)
    assert rows[0] == [] and [str(b) for b in rows[1]] == [
        "c.jsonl:4: the conversation before the first trained assistant turn fills max_length; "
        "nothing to learn from this row"
    ]
    ex = data.Example("c.jsonl", 4, "", messages=turns)
    [row], _ = data.encode([ex], tok, "causal-lm", max_length=first + 2)
    assert row["labels"][first:] == ids[first : first + 2] and set(row["labels"][:first]) == {IGNORE}


def test_a_row_with_nothing_after_its_first_token_labelled_is_not_said_to_fill_max_length(tok):
    """An assistant turn that is the row's first token (nothing predicts it) leaves nothing to learn; the row is
    whole, so the reason is not max_length."""
    tok.chat_template = "{% for m in messages %}{{ m['content'] + ' ' }}{% endfor %}"
    turns = chat.parse_messages([{"role": "assistant", "content": "four"}, {"role": "user", "content": "hello world"}])
    rows, bad = data.encode([data.Example("c.jsonl", 3, "", messages=turns)], tok, "causal-lm", max_length=256)
    assert rows == [] and [str(b) for b in bad] == [
        "c.jsonl:3: no token after the row's first is labelled (the first token is never predicted); "
        "nothing to learn from this row"
    ]


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
