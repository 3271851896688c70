"""`lorakit generate --chat` and `lorakit chat` in process: the chat template chosen and applied (checked against the
template written by hand and transformers' own greedy generation), no prompt echo, streaming, the context limit.
The chat in a real terminal is test_cli_chat_terminal.py."""

from __future__ import annotations

import contextlib
import functools
import io
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.cli import main  # noqa: E402
from lorakit.hf import chat as hf_chat  # noqa: E402
from lorakit.hf import models as hf  # noqa: E402

SYSTEM = "you are a helpful bot"
# the adapter's own template (saved beside it, as finetune --chat-template does): plain words, no ChatML
PLAIN = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}answer :{% endif %}"


def chatml(*messages: tuple[str, str]) -> str:
    """ChatML written by hand, ending in the assistant's header: what the model must be given."""
    turns = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return turns + "<|im_start|>assistant\n"


@functools.cache
def _loaded(model_dir: Path):
    """The model and tokenizer of a directory, loaded once for all the turns checked."""
    return hf.load(model_dir, "causal-lm")


def greedy(model_dir: Path, text: str, max_new_tokens: int) -> str:
    """transformers' own greedy generation from `text` (encoded as a template writes it, no added BOS), up to the
    EOS or the template's end of turn; the new tokens decoded without special tokens."""
    model, tok = _loaded(model_dir)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    stops = [tok.eos_token_id, *hf_chat.end_of_turn_ids(tok)]
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def bot(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2 with a ChatML tokenizer, the same without a template, and an adapter that saved its own."""
    root = tmp_path_factory.mktemp("chat")
    model_dir = _hf_models.save_tiny("gpt2", root / "gpt2", chat_template=_hf_models.CHATML)
    bare = _hf_models.save_tiny("gpt2", root / "bare", chat_template="")
    model = hf.load_model(model_dir, "causal-lm")
    lk.apply_lora(model, lk.LoraConfig(rank=2), ["c_attn"])
    adapter = lk.save_adapters(model, root / "adapter")
    hf.write_task_file(adapter, "causal-lm")
    hf_chat.save_template(adapter, PLAIN)
    (root / "plain.jinja").write_text(PLAIN)
    return {"model": model_dir, "bare": bare, "adapter": adapter, "plain": root / "plain.jinja"}


def run(capsys, *args) -> tuple[int, str, str]:
    status = main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_generate_chat_is_the_template_by_hand_then_transformers_greedy(bot, capsys):
    status, out, err = run(
        capsys, "generate", "--model", bot["model"], "--chat", "the cat sat", "--system", SYSTEM, "--max-new-tokens", 8
    )
    assert status == 0, err
    want = greedy(bot["model"], chatml(("system", SYSTEM), ("user", "the cat sat")), 8)
    assert want and out == want + "\n"  # only the reply: neither the message nor the template is echoed


def test_generate_prints_only_the_completion_and_echoes_on_request(bot, capsys):
    model, tok = hf.load(bot["model"], "causal-lm")
    completion = hf.generate(model, tok, "the cat sat", max_new_tokens=6)
    status, out, err = run(
        capsys, "generate", "--model", bot["model"], "--prompt", "the cat sat", "--max-new-tokens", 6
    )
    assert status == 0, err
    assert completion and out == completion + "\n"
    status, out, _ = run(
        capsys, "generate", "--model", bot["model"], "--prompt", "the cat sat", "--max-new-tokens", 6, "--echo"
    )
    assert status == 0 and out == "the cat sat" + completion + "\n"
    status, out, _ = run(
        capsys, "generate", "--model", bot["model"], "--chat", "hello world", "--max-new-tokens", 6, "--echo"
    )
    prompt = chatml(("user", "hello world"))
    assert status == 0 and out == prompt + greedy(bot["model"], prompt, 6) + "\n"


def test_the_adapters_saved_template_wins_then_a_given_file(bot, capsys):
    args = ["generate", "--model", bot["model"], "--chat", "hello world", "--max-new-tokens", 2, "--echo"]
    status, out, err = run(capsys, *args, "--adapter", bot["adapter"])
    assert status == 0, err
    assert out.startswith("hello world answer :")  # the adapter's template, not the tokenizer's ChatML
    status, out, err = run(
        capsys, "generate", "--model", bot["bare"], "--chat", "hello", "--chat-template", bot["plain"]
    )
    assert status == 0, err
    status, out, err = run(capsys, "generate", "--model", bot["model"], "--prompt", "hi", "--system", SYSTEM)
    assert status == 2 and "--system and --chat-template go with --chat" in err


@pytest.mark.parametrize("command", [["generate", "--chat", "hello"], ["chat"]])
def test_no_template_anywhere_is_exit_2_saying_how_to_give_one(bot, capsys, command):
    status, out, err = run(capsys, command[0], "--model", bot["bare"], *command[1:])
    assert status == 2 and out == ""
    assert "chatting needs a chat template" in err and "the model's tokenizer has none" in err
    assert "pass --chat-template FILE" in err


def chat(capsys, monkeypatch, typed: str, *args) -> tuple[int, str, str]:
    """`lorakit chat` in process, reading `typed` as its input (piped, not a terminal)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    return run(capsys, "chat", *args)


def test_chat_streams_the_reply_while_it_is_generated(bot, monkeypatch, capsys):
    shown: list[int] = []  # how much of the reply stdout holds as each forward pass of the model starts
    screen = io.StringIO()

    def before_forward(module, _args) -> None:
        if type(module).__name__ == "GPT2LMHeadModel":
            shown.append(len(screen.getvalue()))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(before_forward)
    try:
        with contextlib.redirect_stdout(screen):
            status, _, err = chat(
                capsys, monkeypatch, "the cat sat\n/exit\n", "--model", bot["model"], "--max-new-tokens", 8
            )
    finally:
        hook.remove()
    assert status == 0, err
    assert len(shown) >= 3, shown  # a prefill and decode steps
    # text of the reply is on the screen before the last decode step runs, and more of it with each step
    assert shown[0] < shown[1] < shown[-1] < len(screen.getvalue()), (shown, screen.getvalue())


def test_chat_drops_the_oldest_turns_past_the_context_and_refuses_a_message_too_long(bot, monkeypatch, capsys):
    system = "one two three four five " * 19  # 95 words: 98 tokens as a system message
    too_long = " ".join(["the quick brown fox jumps over the lazy dog"] * 3)
    typed = f"the cat sat\nhello world\n{too_long}\n"  # then end of input
    # the tiny model reads 128 tokens; 16 kept for the reply leave 112: the system message and one short message
    # (105 tokens) fit, with the first exchange too (113 tokens and the reply) they do not
    args = ["--model", bot["model"], "--max-new-tokens", 16, "--system", system, "--echo"]
    status, out, err = chat(capsys, monkeypatch, typed, *args)
    assert status == 0, err
    assert err.count("note: the conversation outgrew the model's context of 128 tokens (16 kept for the reply)") == 1
    assert "dropped its oldest 2 message(s)" in err
    assert "lorakit chat: not sent: the last message makes a prompt of 130 tokens" in err
    # the second turn's prompt holds the system message and the second message: the first exchange was dropped
    assert f"you> {chatml(('system', system), ('user', 'the cat sat'))}" in out
    assert f"you> {chatml(('system', system), ('user', 'hello world'))}" in out
    assert out.endswith("you> \n")  # end of input: a clean line, status 0
