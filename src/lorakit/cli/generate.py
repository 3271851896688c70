"""`lorakit generate`: complete a prompt with the base, an adapter, one completion per adapter, or their
weighted combination (`--adapter NAME=DIR` repeatable, `--weight NAME=W`)."""

from __future__ import annotations

import argparse
from functools import partial
from typing import TYPE_CHECKING

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
    for _, d in specs:
        task, _ = inputs(hf.read_task, d)
        if task != "causal-lm":
            raise BadInput(f"{d} is a {task} adapter; generate needs a causal-lm adapter")
    progress = Progress()
    with progress.task(f"loading the model {args.model}"):
        model, tok = inputs(hf.load, model_dir(args), "causal-lm", trust_remote_code=args.trust_remote_code)
    if args.device:
        model.to(args.device)
    complete = partial(_complete, model, tok, args)
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


def _complete(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, args: argparse.Namespace, title: str | None
) -> None:
    """Print the prompt and its completion (under `title`, where several are shown)."""
    if title:
        print(f"--- {title} ---")
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    print(args.prompt + hf.generate(model, tok, args.prompt, **options))


def add_generate(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Flags of `lorakit generate`."""
    p = subparsers.add_parser(
        "generate",
        help="generate text from a causal LM, with or without an adapter",
        description="Complete a prompt with a local causal LM; greedy by default, sampling with --temperature > 0. "
        "With --compare, print the base model's completion and then the adapter's.",
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
    p.add_argument("--prompt", required=True, help="the text to complete")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default 40)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--compare", action="store_true", help="also show the base model's completion")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped in the model directory")
    add_base_mismatch_flag(p)
    p.set_defaults(run=generate)
