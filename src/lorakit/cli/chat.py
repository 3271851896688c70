"""`lorakit chat`: a conversation with a causal LM (and an adapter) in the terminal.

Each turn the whole conversation is rendered again with the chat template (the adapter's saved one, else the
tokenizer's, or `--chat-template FILE`) and the reply is streamed as its tokens are drawn, by transformers'
`TextStreamer` over lorakit's own generation loop, so a seeded turn gives the tokens `generate --chat` gives.
When the conversation outgrows the model's context its oldest messages are dropped, with a note. `/reset`
clears it; `/exit` or end of input (Ctrl-D) leaves with status 0, Ctrl-C as from every command (interrupted).
The sampling and chat-template flags are generate's own (`generate.add_sampling_flags`, `add_template_flags`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..hf import models as hf
from ..ui.progress import Progress
from .common import (
    BadInput,
    add_base_mismatch_flag,
    add_model_flags,
    base_check,
    check_sampling,
    inputs,
    model_dir,
    quiet_transformers,
)
from .generate import add_sampling_flags, add_template_flags, sampling

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..hf.conversation import Conversation

PROMPT = "you> "  # what the terminal shows when it waits for the user's message
COMMANDS = "/reset clears the conversation, /exit (or Ctrl-D) leaves"


@dataclass
class _Session:
    """The loaded model and the conversation with it: what each turn needs."""

    model: PreTrainedModel
    tok: PreTrainedTokenizerBase
    talk: Conversation
    context: int | None  # the model's context in tokens (None: not known, nothing is dropped)
    stop_token_ids: tuple[int, ...]  # the template's end of turn, besides the model's EOS
    args: argparse.Namespace
    replies: int = 0  # replies since the start or the last /reset: turn k samples with seed + k


def chat(args: argparse.Namespace) -> int:
    """Run `lorakit chat`: load the model (and adapter), then answer each message until /exit or end of input."""
    quiet_transformers()
    check_sampling(args)
    session = _open(args)
    print(f"lorakit chat: {_title(args)}; {COMMANDS}", file=sys.stderr)
    _converse(session)
    return 0


def _open(args: argparse.Namespace) -> _Session:
    """The model, tokenizer, adapter and chat template of the session; BadInput before the model loads where the
    adapter or the template cannot do."""
    from ..hf import chat as templates
    from ..hf import conversation
    from ..loading import load_adapters

    if args.adapter:
        task, _ = inputs(hf.read_task, args.adapter)
        if task != "causal-lm":
            raise BadInput(f"{args.adapter} is a {task} adapter; chat needs a causal-lm adapter")
    base = model_dir(args)
    progress = Progress()
    with progress.task(f"loading the tokenizer of {args.model}"):
        tok = inputs(hf.load_tokenizer, base, trust_remote_code=args.trust_remote_code)
    adapters = {"adapter": args.adapter} if args.adapter else {}
    template = inputs(conversation.choose_template, tok, base, adapters, args.chat_template)
    with progress.task(f"loading the model {args.model}"):
        model = inputs(hf.load_model, base, "causal-lm", trust_remote_code=args.trust_remote_code)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tok.pad_token_id
    if args.adapter:
        with progress.task(f"loading the adapter {args.adapter}"):
            inputs(load_adapters, model, args.adapter, **base_check(args))
    if args.device:
        model.to(args.device)
    context = conversation.context_length(model, tok)
    if context is not None and args.max_new_tokens >= context:
        raise BadInput(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for the conversation in the model's context "
            f"of {context} tokens; pass a smaller --max-new-tokens"
        )
    talk = conversation.Conversation(template, system=args.system)
    stops = tuple(templates.end_of_turn_ids(tok, template))
    return _Session(model, tok, talk, context, stops, args)


def _title(args: argparse.Namespace) -> str:
    """What the session talks with, and whose chat template it renders with."""
    from ..hf.templates import TEMPLATE_FILE, load_template

    who = f"{args.model}" + (f" + {args.adapter}" if args.adapter else "")
    if args.chat_template:
        source = str(args.chat_template)
    elif args.adapter and load_template(args.adapter) is not None:
        source = f"the adapter's {TEMPLATE_FILE}"
    else:
        source = "the tokenizer's"
    return f"{who}, chat template: {source}"


def _converse(session: _Session) -> None:
    """Read a message at a time until /exit or end of input; /reset clears the conversation."""
    if sys.stdin.isatty():
        import readline  # noqa: F401  (input() then edits the line and recalls earlier ones, as a shell does)
    while True:
        try:
            line = input(PROMPT).strip()
        except EOFError:  # Ctrl-D, or the end of piped input
            print()
            return
        if line == "/exit":
            return
        if line == "/reset":
            session.talk.reset()
            session.replies = 0
            print("(conversation cleared)")
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {COMMANDS}", file=sys.stderr)
        elif line:
            _reply(session, line)


def _reply(session: _Session, message: str) -> None:
    """Answer `message` in the light of the conversation so far, streaming the reply; both join the conversation."""
    from transformers import TextStreamer

    args, talk = session.args, session.talk
    room = None if session.context is None else session.context - args.max_new_tokens
    talk.add("user", message)
    try:
        prompt = talk.prompt(session.tok, room)
    except ValueError as e:  # this message alone does not fit beside the reply
        talk.turns.pop()
        print(f"lorakit chat: not sent: {e} (--max-new-tokens {args.max_new_tokens})", file=sys.stderr)
        return
    if prompt.dropped:
        print(
            f"note: the conversation outgrew the model's context of {session.context} tokens "
            f"({args.max_new_tokens} kept for the reply): dropped its oldest {prompt.dropped} message(s)",
            file=sys.stderr,
        )
    if args.echo:
        print(prompt.text, end="", flush=True)
    options = {**sampling(args), "seed": args.seed + session.replies}
    streamer = TextStreamer(session.tok, skip_special_tokens=True)  # prints each piece of text as it is drawn
    ended = False
    try:
        reply = hf.generate(
            session.model,
            session.tok,
            prompt.text,
            templated=True,
            stop_token_ids=session.stop_token_ids,
            streamer=streamer,
            **options,
        )
        ended = True
    finally:
        if not ended:  # stopped mid-reply (Ctrl-C): end its line, so the message below it starts a line of its own
            print(flush=True)
    talk.add("assistant", reply)
    session.replies += 1


def add_chat(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Flags of `lorakit chat`."""
    p = subparsers.add_parser(
        "chat",
        help="talk with a causal LM (and an adapter) in the terminal",
        description="An interactive chat: each message is answered through the chat template (the adapter's "
        "saved one, else the tokenizer's, or --chat-template FILE) with the whole conversation so far, the "
        "reply streamed as it is generated. The oldest messages are dropped, with a note, when the conversation "
        f"outgrows the model's context. {COMMANDS}. Greedy by default, sampling with --temperature > 0 (turn k "
        "of a conversation draws with --seed + k).",
    )
    add_model_flags(p)
    p.add_argument("--adapter", metavar="DIR", help="an adapter directory to load (lorakit or PEFT)")
    add_template_flags(p)
    p.add_argument("--echo", action="store_true", help="print each turn's prompt, as templated, before the reply")
    add_sampling_flags(p, max_new_tokens=256)
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped in the model directory")
    add_base_mismatch_flag(p)
    p.set_defaults(run=chat)
