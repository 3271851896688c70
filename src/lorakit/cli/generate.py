"""`lorakit generate`: complete a prompt (`--prompt TEXT`), or answer one chat message through the chat template
(`--chat TEXT`), with the base, an adapter, one completion per adapter, or their weighted combination
(`--adapter NAME=DIR` repeatable, `--weight NAME=W`). Only the generated text is printed (`--echo`: the prompt
too). The sampling and chat-template flags are declared here once, and `lorakit chat` takes them from here."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..hf import models as hf
from ..ui.progress import Progress
from .adapter_specs import adapter_specs, add_combine_flags, combine, parse_weights
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

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def generate(args: argparse.Namespace) -> int:
    """Run `lorakit generate`: the base's completion, an adapter's, one per adapter, or a combination's."""
    from .. import adapters
    from ..loading import load_adapters

    quiet_transformers()
    check_sampling(args)
    specs, weights = adapter_specs(args.adapter or []), parse_weights(args.weight)
    if args.compare and not specs:
        raise BadInput("--compare needs --adapter")
    if args.chat is None and (args.system is not None or args.chat_template):
        raise BadInput("--system and --chat-template go with --chat (a chat message), not with --prompt")
    for _, d in specs:
        task, _ = inputs(hf.read_task, d)
        if task != "causal-lm":
            raise BadInput(f"{d} is a {task} adapter; generate needs a causal-lm adapter")
    progress = Progress()
    with progress.task(f"loading the model {args.model}"):
        model, tok = inputs(hf.load, model_dir(args), "causal-lm", trust_remote_code=args.trust_remote_code)
    if args.device:
        model.to(args.device)
    complete = partial(_complete, model, tok, args, _prompt(args, tok, specs))
    if args.compare:
        complete("base")
    if len(specs) == 1 and not weights:
        with progress.task(f"loading the adapter {specs[0][1]}"):
            inputs(load_adapters, model, specs[0][1], **base_check(args))
        complete("base + adapter" if args.compare else None)
        return 0
    for name, d in specs:
        with progress.task(f"loading the adapter {d}"):
            inputs(load_adapters, model, d, name=name, **base_check(args))
    if specs and not weights:  # one completion per adapter, on the one shared base
        for name, _ in specs:
            with adapters.use_adapter(model, name):
                complete(f"adapter {name}")
        return 0
    if specs:
        report = combine(model, specs, weights, args.combine, args.combine_rank)
        complete(f"combined ({report.method}, max relative error of ΔW {report.max_relative_error:.3g})")
    else:
        complete(None)
    return 0


@dataclass(frozen=True)
class _Prompt:
    """What the model continues: the text, whether it is a rendered chat template, and the template's end of turn."""

    text: str
    templated: bool = False
    stop_token_ids: tuple[int, ...] = ()


def _prompt(args: argparse.Namespace, tok: PreTrainedTokenizerBase, specs: list[tuple[str, Path]]) -> _Prompt:
    """--prompt as given, or --chat rendered with the chat template (given, the adapters', else the tokenizer's)."""
    from ..hf import chat, conversation

    if args.chat is None:
        return _Prompt(args.prompt)
    template = inputs(conversation.choose_template, tok, args.model, dict(specs), args.chat_template)
    talk = conversation.Conversation(template, system=args.system)
    talk.add("user", args.chat)
    text = inputs(talk.render, tok).text
    return _Prompt(text, templated=True, stop_token_ids=tuple(chat.end_of_turn_ids(tok, template)))


def _complete(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, args: argparse.Namespace, prompt: _Prompt, title: str | None
) -> None:
    """Print the completion (after the prompt with --echo; under `title`, where several are shown)."""
    if title:
        print(f"--- {title} ---")
    text = hf.generate(
        model, tok, prompt.text, templated=prompt.templated, stop_token_ids=prompt.stop_token_ids, **sampling(args)
    )
    print((prompt.text if args.echo else "") + text)


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The keywords of `hf.generate` that the sampling flags (`add_sampling_flags`) set."""
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def add_sampling_flags(p: argparse.ArgumentParser, *, max_new_tokens: int = 40) -> None:
    """--max-new-tokens, --temperature, --top-p, --top-k, --seed: how a completion is drawn (generate, chat)."""
    p.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, help=f"tokens to generate (default {max_new_tokens})"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")


def add_template_flags(p: argparse.ArgumentParser) -> None:
    """--system, --chat-template: how a chat message is rendered (generate --chat, chat)."""
    p.add_argument("--system", metavar="TEXT", help="a system message before the conversation")
    p.add_argument(
        "--chat-template",
        metavar="FILE",
        help="a Jinja chat template (default: the one the adapter trained with, else the tokenizer's)",
    )


def add_generate(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Flags of `lorakit generate`."""
    p = subparsers.add_parser(
        "generate",
        help="generate text from a causal LM, with or without an adapter",
        description="Complete a prompt (--prompt), or answer one chat message through the chat template (--chat), "
        "with a local causal LM; greedy by default, sampling with --temperature > 0. Prints only the generated text "
        "(--echo: the prompt before it). With --compare, print the base model's completion and then the adapter's. "
        "For a conversation, see `lorakit chat`.",
    )
    add_model_flags(p)
    p.add_argument(
        "--adapter",
        action="append",
        metavar="[NAME=]DIR",
        help="an adapter directory to load (lorakit or PEFT); repeat for one completion per adapter, "
        "or with --weight for one completion of their weighted combination",
    )
    add_combine_flags(p)
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="the text to complete, as it is")
    given.add_argument("--chat", metavar="TEXT", help="a user message, answered through the chat template")
    add_template_flags(p)
    p.add_argument(
        "--echo", action="store_true", help="print the prompt before the completion (with --chat: as templated)"
    )
    add_sampling_flags(p)
    p.add_argument("--compare", action="store_true", help="also show the base model's completion")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped in the model directory")
    add_base_mismatch_flag(p)
    p.set_defaults(run=generate)
