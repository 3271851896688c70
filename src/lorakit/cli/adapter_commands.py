"""`lorakit inspect | merge | generate`: look into an adapter, fold adapters into a base, complete a prompt.

`merge` and `generate` take one adapter or several (`--adapter NAME=DIR`, repeatable), and combine several
with `--weight NAME=W` (adapters.combine_adapters).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..adapters import COMBINE_METHODS, CombineReport
from ..files.atomic import replacing_dir
from ..hf import models as hf
from ..ui.progress import Progress
from .common import (
    BadInput,
    add_base_mismatch_flag,
    base_check,
    check_sampling,
    inputs,
    new_or_empty,
    quiet_transformers,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# -- inspect ---------------------------------------------------------------------------------------


def inspect(args: argparse.Namespace) -> int:
    """Run `lorakit inspect`."""
    from ..files import inspect as adapter_info

    info = inputs(adapter_info.describe, args.adapter)
    # -- provenance: the base the adapter was saved for; with --model, whether DIR holds it
    from . import inspect_provenance

    if info.get("kind") == "model adapter (PEFT layout)":
        info.update(inspect_provenance.provenance_info(args))
    # -- portability report: --target, and with --model the base's config.json too ----------
    found = None
    if args.target:
        from ..export import portability

        model = inputs(portability.read_model_config, Path(args.model)) if args.model else None
        found = portability.check(info, list(dict.fromkeys(args.target)), model)
        info["portability"] = {t: [f.to_json() for f in fs] for t, fs in found.items()}
    # -------------------------------------------------------------------------------------------------
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        text = adapter_info.render(info) + (inspect_provenance.render(info) if "provenance" in info else "")
        print(text + ("\n\n" + portability.render(found) if found else ""))
    return 0


# -- merge -----------------------------------------------------------------------------------------


def merge(args: argparse.Namespace) -> int:
    """Run `lorakit merge`: one adapter, or a weighted combination of several, folded into the base and saved."""
    quiet_transformers()
    out = Path(args.out)
    if not args.overwrite:  # before the model is loaded
        new_or_empty(out, "pass --overwrite to replace it, or choose a new --out")
    elif out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: is a file; --overwrite replaces a directory, not a file")
    inputs(hf.check_model_dir, args.model)
    specs, weights = _adapter_specs(args.adapter), _weights(args.weight)
    progress = Progress()
    if len(specs) == 1 and not weights:
        model, tok, task = inputs(
            hf.load_with_adapter,
            args.model,
            specs[0][1],
            task=args.task,
            trust_remote_code=args.trust_remote_code,
            allow_base_mismatch=args.allow_base_mismatch,
            progress=progress,
        )
        what = str(specs[0][1])
    else:
        model, tok, task = _load_named(args.model, specs, args.task, args.trust_remote_code, progress, args)
        report = _combine(model, specs, weights, args.combine, args.combine_rank)
        what = f"{report.method} of " + ", ".join(f"{w:g}×{n}" for n, w in _weights_for(specs, weights).items())
        print(f"combined ({report.method}): max relative error of ΔW {report.max_relative_error:.3g}")
    with replacing_dir(out) as new:  # written aside, then swapped in: a failed merge leaves OUT as it was
        n = hf.save_merged(model, tok, new, dtype=args.dtype, progress=progress, shown_as=out)
    print(f"merged {n} LoRA modules of {what} into {args.model} ({task}); wrote {out}")
    return 0


# -- generate --------------------------------------------------------------------------------------


def generate(args: argparse.Namespace) -> int:
    """Run `lorakit generate`: the base's completion, an adapter's, one per adapter, or a combination's."""
    from .. import adapters
    from ..loading import load_adapters

    quiet_transformers()
    check_sampling(args)
    specs, weights = _adapter_specs(args.adapter or []), _weights(args.weight)
    if args.compare and not specs:
        raise BadInput("--compare needs --adapter")
    for _, d in specs:
        task, _ = inputs(hf.read_task, d)
        if task != "causal-lm":
            raise BadInput(f"{d} is a {task} adapter; generate needs a causal-lm adapter")
    progress = Progress()
    with progress.task(f"loading the model {args.model}"):
        model, tok = inputs(hf.load, args.model, "causal-lm", trust_remote_code=args.trust_remote_code)
    if args.device:
        model.to(args.device)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )

    def complete(title: str | None) -> None:
        if title:
            print(f"--- {title} ---")
        print(args.prompt + hf.generate(model, tok, args.prompt, **options))

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
        report = _combine(model, specs, weights, args.combine, args.combine_rank)
        complete(f"combined ({report.method}, max relative error of ΔW {report.max_relative_error:.3g})")
    else:
        complete(None)
    return 0


# -- several adapters: --adapter NAME=DIR, --weight NAME=W -------------------------------------------


def _adapter_specs(values: list[str]) -> list[tuple[str, Path]]:
    """[(name, dir)] from `--adapter DIR` or `--adapter NAME=DIR` (repeatable); names default to the folder's."""
    from ..layers import check_adapter_name

    specs: list[tuple[str, Path]] = []
    for value in values:
        name, sep, d = value.partition("=")
        name, d = (name, d) if sep else (Path(value).name.replace(".", "_") or "adapter", value)
        try:
            check_adapter_name(name)
        except ValueError as e:
            raise BadInput(f"--adapter {value!r}: {e}") from None
        if name in dict(specs):
            raise BadInput(f"--adapter: the name {name!r} is given twice; write NAME=DIR to tell them apart")
        specs.append((name, Path(d)))
    return specs


def _weights(values: list[str] | None) -> dict[str, float]:
    """{name: weight} from `--weight NAME=W` (repeatable)."""
    out = {}
    for value in values or []:
        name, sep, w = value.partition("=")
        try:
            out[name] = float(w) if sep else float("nan")
        except ValueError:
            out[name] = float("nan")
        if out[name] != out[name]:
            raise BadInput(f"--weight {value!r} is invalid: expected NAME=NUMBER")
    return out


def _weights_for(specs: list[tuple[str, Path]], weights: dict[str, float]) -> dict[str, float]:
    """{name: weight} for every --adapter (1 where no --weight names it); unknown --weight names are BadInput."""
    unknown = sorted(set(weights) - {n for n, _ in specs})
    if unknown:
        raise BadInput(f"--weight names {unknown} match no --adapter; adapters: {[n for n, _ in specs]}")
    return {n: weights.get(n, 1.0) for n, _ in specs}


def _load_named(
    model_dir: str,
    specs: list[tuple[str, Path]],
    task: str | None,
    trust_remote_code: bool,
    progress: Progress,
    args: argparse.Namespace,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """The base with every adapter loaded under its name (all for the same task)."""
    from ..loading import load_adapters

    tasks = {n: inputs(hf.read_task, d) for n, d in specs}
    kinds = {t for t, _ in tasks.values()}
    if len(kinds) > 1:
        raise BadInput(f"the adapters are for different tasks: { ({n: t for n, (t, _) in tasks.items()}) }")
    task = task or kinds.pop()
    if task == "seq-cls":
        raise BadInput("several adapters with classification heads cannot share one model; merge them one at a time")
    with progress.task(f"loading the model {model_dir}"):
        model, tok = inputs(hf.load, model_dir, task, trust_remote_code=trust_remote_code)
    for name, d in specs:
        with progress.task(f"loading the adapter {d}"):
            inputs(load_adapters, model, d, name=name, **base_check(args))
    return model, tok, task


def _combine(
    model: nn.Module, specs: list[tuple[str, Path]], weights: dict[str, float], method: str, rank: int | None
) -> CombineReport:
    """Combine the named adapters into one active adapter "combined"; the originals are dropped."""
    from .. import adapters

    report = inputs(
        adapters.combine_adapters, model, _weights_for(specs, weights), "combined", method=method, rank=rank
    )
    adapters.set_adapter(model, "combined")
    for name, _ in specs:
        adapters.delete_adapter(model, name)
    return report


# -- the parsers -----------------------------------------------------------------------------------


def add_inspect(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Flags of `lorakit inspect`."""
    p = subparsers.add_parser(
        "inspect",
        help="show what an adapter holds (lorakit- or PEFT-made)",
        description="Show an adapter's config, targets, per-module shapes and ranks, parameter count, file size "
        "and the base weight shapes it expects. Reads only JSON and safetensors.",
    )
    p.add_argument("adapter", help="adapter directory, its adapter_model.safetensors, or a lorakit layer .safetensors")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.add_argument(
        "--target",
        action="append",
        choices=("vllm", "llama.cpp", "onnx", "peft"),
        help="report what this runtime refuses or computes differently for the adapter, and what fixes it "
        "(repeatable); docs/export.md lists the rules and their sources",
    )
    p.add_argument(
        "--model",
        metavar="DIR",
        help="a base model directory: say whether the adapter was saved for it (and with --target, check its "
        "config.json for the runtime too)",
    )
    p.set_defaults(run=inspect)


def add_merge(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Flags of `lorakit merge`."""
    p = subparsers.add_parser(
        "merge",
        help="merge an adapter into its base model and save a plain transformers model",
        description="Load the base model and adapter, fold the adapter into the weights (in fp32), and write a "
        "directory that transformers' AutoModel*.from_pretrained(OUT) loads: weights, config, tokenizer.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="the base model directory (local Hugging Face format)")
    p.add_argument(
        "--adapter",
        required=True,
        action="append",
        metavar="[NAME=]DIR",
        help="the adapter directory (lorakit or PEFT); repeat to merge several, combined with --weight",
    )
    _add_combine_flags(p)
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model (new or empty)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what is in --out (the merged model is written beside it and swapped in when complete)",
    )
    p.add_argument("--dtype", choices=list(hf.DTYPES), help="cast the merged weights (default: as stored)")
    p.add_argument("--task", choices=hf.TASKS, help="default: what the adapter directory records")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped in the model directory")
    add_base_mismatch_flag(p)
    p.set_defaults(run=merge)


def add_generate(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Flags of `lorakit generate`."""
    p = subparsers.add_parser(
        "generate",
        help="generate text from a causal LM, with or without an adapter",
        description="Complete a prompt with a local causal LM; greedy by default, sampling with --temperature > 0. "
        "With --compare, print the base model's completion and then the adapter's.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="the base model directory")
    p.add_argument(
        "--adapter",
        action="append",
        metavar="[NAME=]DIR",
        help="an adapter directory to load (lorakit or PEFT); repeat for one completion per adapter, "
        "or with --weight for one completion of their weighted combination",
    )
    _add_combine_flags(p)
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


def _add_combine_flags(p: argparse.ArgumentParser) -> None:
    """--weight, --combine, --combine-rank: how several adapters combine (merge and generate)."""
    p.add_argument(
        "--weight",
        action="append",
        metavar="NAME=W",
        help="weight of adapter NAME in a combination (default 1 for each); repeatable",
    )
    p.add_argument(
        "--combine",
        choices=COMBINE_METHODS,
        default="cat",
        help="how several adapters combine: cat (exact, ranks add up; default), svd (to --combine-rank), "
        "linear (equal ranks, approximate)",
    )
    p.add_argument("--combine-rank", type=int, help="the rank of an svd combination")
