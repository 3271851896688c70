"""`lorakit merge`: fold one adapter, or a weighted combination of several, into a base and save it.

Several adapters are given as `--adapter NAME=DIR` (repeatable) and combined with `--weight NAME=W`
(adapters.combine_adapters).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..files.atomic import replacing_dir
from ..hf import models as hf
from ..ui.progress import Progress
from .adapter_specs import adapter_specs, add_combine_flags, combine, parse_weights, weights_for
from .common import (
    BadInput,
    add_base_mismatch_flag,
    add_model_flags,
    base_check,
    inputs,
    model_dir,
    new_or_empty,
    quiet_transformers,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def merge(args: argparse.Namespace) -> int:
    """Run `lorakit merge`: one adapter, or a weighted combination of several, folded into the base and saved."""
    quiet_transformers()
    out = Path(args.out)
    if not args.overwrite:  # before the model is loaded
        new_or_empty(out, "pass --overwrite to replace it, or choose a new --out")
    elif out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: is a file; --overwrite replaces a directory, not a file")
    base = model_dir(args)
    specs, weights = adapter_specs(args.adapter), parse_weights(args.weight)
    progress = Progress()
    if len(specs) == 1 and not weights:
        model, tok, task = inputs(
            hf.load_with_adapter,
            base,
            specs[0][1],
            task=args.task,
            trust_remote_code=args.trust_remote_code,
            allow_base_mismatch=args.allow_base_mismatch,
            progress=progress,
        )
        what = str(specs[0][1])
    else:
        model, tok, task = _load_named(base, specs, args.task, args.trust_remote_code, progress, args)
        report = combine(model, specs, weights, args.combine, args.combine_rank)
        what = f"{report.method} of " + ", ".join(f"{w:g}×{n}" for n, w in weights_for(specs, weights).items())
        print(f"combined ({report.method}): max relative error of ΔW {report.max_relative_error:.3g}")
    with replacing_dir(out) as new:  # written aside, then swapped in: a failed merge leaves OUT as it was
        n = hf.save_merged(model, tok, new, dtype=args.dtype, progress=progress, shown_as=out)
    print(f"merged {n} LoRA modules of {what} into {args.model} ({task}); wrote {out}")
    return 0


def _load_named(
    model_dir: Path,
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


def add_merge(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Flags of `lorakit merge`."""
    p = subparsers.add_parser(
        "merge",
        help="merge an adapter into its base model and save a plain transformers model",
        description="Load the base model and adapter, fold the adapter into the weights (in fp32), and write a "
        "directory that transformers' AutoModel*.from_pretrained(OUT) loads: weights, config, tokenizer.",
    )
    add_model_flags(p)
    p.add_argument(
        "--adapter",
        required=True,
        action="append",
        metavar="[NAME=]DIR",
        help="the adapter directory (lorakit or PEFT); repeat to merge several, combined with --weight",
    )
    add_combine_flags(p)
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
