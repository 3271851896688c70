"""A conversation kept across turns (hf/conversation.py): the template chosen, the whole rendered each turn, the
oldest exchanges dropped to fit the context, the system message always kept."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

from lorakit.hf import conversation as cv  # noqa: E402
from lorakit.hf.examples import Turn  # noqa: E402
from lorakit.hf.rows import DataError  # noqa: E402

OTHER = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


@pytest.fixture(scope="module")
def tok():
    return _hf_models.tokenizer(bos=False, chat=True)


def test_the_whole_conversation_is_rendered_each_turn(tok):
    talk = cv.Conversation(_hf_models.CHATML, system="you are a helpful bot")
    talk.add("user", "hello world")
    talk.add("assistant", "good morning")
    talk.add("user", "the cat sat")
    prompt = talk.prompt(tok, None)
    assert prompt.text == (
        "<|im_start|>system\nyou are a helpful bot<|im_end|>\n<|im_start|>user\nhello world<|im_end|>\n"
        "<|im_start|>assistant\ngood morning<|im_end|>\n<|im_start|>user\nthe cat sat<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prompt.ids == tok(prompt.text, add_special_tokens=False)["input_ids"] and prompt.dropped == 0
    talk.reset()
    assert talk.turns == [] and talk.system == "you are a helpful bot"


def test_the_oldest_exchanges_go_first_and_the_system_message_stays(tok):
    talk = cv.Conversation(_hf_models.CHATML, system="hello")
    for user, reply in [("the cat sat", "on the mat"), ("a bird sang", "a song"), ("we like", "green tea")]:
        talk.add("user", user)
        talk.add("assistant", reply)
    talk.add("user", "good morning")
    last_two = cv.Conversation(_hf_models.CHATML, system="hello", turns=talk.turns[-3:]).prompt(tok, None)
    prompt = talk.prompt(tok, len(last_two.ids))  # room for the system message, one exchange and the new message
    assert prompt == cv.Prompt(last_two.text, last_two.ids, 4)
    assert talk.turns == [Turn("user", "we like"), Turn("assistant", "green tea"), Turn("user", "good morning")]


def test_a_message_that_cannot_fit_leaves_the_conversation_unchanged(tok):
    talk = cv.Conversation(_hf_models.CHATML)
    talk.add("user", "hello")
    talk.add("assistant", "world")
    talk.add("user", "the quick brown fox jumps over the lazy dog")
    before = list(talk.turns)
    with pytest.raises(
        ValueError, match="the last message makes a prompt of 14 tokens, and the model's context leaves 6"
    ):
        talk.prompt(tok, 6)
    assert talk.turns == before


def test_the_template_given_then_the_adapters_then_the_tokenizers(tok, tmp_path):
    from lorakit.hf.templates import save_template

    (tmp_path / "given.jinja").write_text(OTHER)
    (tmp_path / "a").mkdir()
    save_template(tmp_path / "a", "{{ messages[0]['content'] }}")  # as finetune saves the one it trained with
    assert cv.choose_template(tok, "m", {"a": tmp_path / "a"}, tmp_path / "given.jinja") == OTHER
    assert cv.choose_template(tok, "m", {"a": tmp_path / "a"}) == "{{ messages[0]['content'] }}"
    assert cv.choose_template(tok, "m", {"b": tmp_path / "b"}) == _hf_models.CHATML
    bare = _hf_models.tokenizer(bos=False, chat=False)
    with pytest.raises(DataError, match=r"m: chatting needs a chat template; no adapter saved one \(chat_template"):
        cv.choose_template(bare, "m", {"b": tmp_path / "b"})


def test_the_context_is_the_models_positions_else_the_tokenizers_limit():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _hf_models.tokenizer(bos=False, chat=True)

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=64))
    assert cv.context_length(model, tok) == 64
    model.config.max_position_embeddings = None  # a config that does not say
    tok.model_max_length = 100
    assert cv.context_length(model, tok) == 100
    tok.model_max_length = int(1e30)  # transformers' "no limit"
    assert cv.context_length(model, tok) is None
