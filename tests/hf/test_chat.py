"""lorakit.hf.chat's loss mask: on assistant turns only, checked token by token and against transformers' own
{% generation %} mask (byte-level BPE too), with and without a generation prompt, under truncation.

Chat rows, templates, Alpaca rows and `lorakit finetune` on chat are in test_chat_rows.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _chat import CHATML_GEN, CONVERSATION, IGNORE, _ids, _labelled_runs  # noqa: E402

pytest.importorskip("transformers")

from lorakit.hf import chat, data  # noqa: E402

LLAMA2 = (  # Llama-2 style: the system folded into the first user turn, no generation prompt, EOS ends a turn
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '<<SYS>> ' + m['content'] + ' <</SYS>> ' }}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture()
def tok():
    return _hf_models.tokenizer(bos=True, chat=True)  # a fresh one: tests set templates on it


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
