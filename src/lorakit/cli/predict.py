"""`lorakit predict`: one JSON line per input row, in input order: labels with probabilities, or completions
(hf/predict.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..hf import data
from ..hf import models as hf
from .common import (
    BadInput,
    add_base_mismatch_flag,
    add_model_flags,
    base_check,
    check_sampling,
    inputs,
    model_dir,
    positive_int,
    quiet_transformers,
)


def predict(args: argparse.Namespace) -> int:
    """Run `lorakit predict`: check every input row, then one JSON line per row on stdout, in input order."""
    from ..hf import chat
    from ..hf import predict as pr
    from ..loading import load_adapters
    from ..ui.progress import Progress

    quiet_transformers()
    check_sampling(args)
    model_path = model_dir(args)
    task, id2label = inputs(hf.read_task, args.adapter) if args.adapter else ("causal-lm", None)
    progress = Progress()
    with progress.task("loading tokenizer"):
        tok = inputs(hf.load_tokenizer, model_path, trust_remote_code=args.trust_remote_code)
    if args.chat_template:
        tok.chat_template = inputs(chat.read_template, args.chat_template)
    elif args.adapter and (trained := chat.load_template(args.adapter)) is not None:
        tok.chat_template = trained  # the template the adapter trained with (finetune --chat-template)
    if args.input != pr.STDIN and not Path(args.input).is_file():
        raise BadInput(f"--input {args.input}: no such file")
    try:
        requests, bad = inputs(pr.read_requests, args.input, task, tok)
    except OSError as e:
        raise BadInput(str(e)) from None
    if bad and not args.skip_bad_rows:
        listing = data.BadRowsError(bad).listing  # the first rows, as finetune lists them
        raise BadInput(f"{len(bad)} bad input row(s); fix them, or pass --skip-bad-rows:\n{listing}")
    with progress.task("loading model"):
        model = inputs(hf.load_model, model_path, task, id2label=id2label, trust_remote_code=args.trust_remote_code)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tok.pad_token_id
        if args.adapter:
            inputs(load_adapters, model, args.adapter, **base_check(args))
        model.to(args.device or "cpu")  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides the bound self
    if task == "seq-cls":
        assert id2label is not None  # read_task gives seq-cls adapters their labels
        max_length = args.max_length or _trained_max_length(args.adapter)
        results = pr.classify(
            model, tok, requests, id2label, batch_size=args.batch_size, max_length=max_length, progress=progress
        )
    else:
        completions = pr.complete(
            model,
            tok,
            requests,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=progress,
        )
        results = [{"completion": c} for c in completions]
    lines: list[tuple[int, dict[str, Any]]] = [(b.line, {"line": b.line, "error": b.reason}) for b in bad]
    for r, result in zip(requests, results, strict=True):
        lines.append((r.line, {"line": r.line, **({"id": r.id} if r.id is not None else {}), **result}))
    for _, obj in sorted(lines, key=lambda x: x[0]):
        print(json.dumps(obj, ensure_ascii=False))
    return 0


def _trained_max_length(adapter: str | None) -> int:
    """The max_length the adapter was trained with, else the default."""
    from ..hf import evaluate as ev

    return (ev.trained_max_length(adapter) if adapter else None) or ev.DEFAULT_MAX_LENGTH


def add_predict(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Flags of `lorakit predict`."""
    p = subparsers.add_parser(
        "predict",
        help="predict for JSONL input rows: labels with probabilities, or completions",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="One JSON line per input row on stdout, in input order.\n\n"
        'input rows (JSONL; stdin when --input is - or omitted), with an optional "id" carried through:\n'
        '  {"text": ...}  {"prompt": ...}  {"messages": [{"role": "user", "content": ...}, ...]}\n'
        "output:\n"
        '  seq-cls    {"line": N, "label": "pos", "probabilities": {"neg": 0.1, "pos": 0.9}}\n'
        '  causal-lm  {"line": N, "completion": "..."}   (greedy by default; batched, left-padded)\n\n'
        "Every row is checked first: a bad one stops the run before any output (file:line: reason), or\n"
        'with --skip-bad-rows becomes {"line": N, "error": "..."}. Chats use the tokenizer\'s chat template\n'
        "(or --chat-template FILE), ending with the assistant's turn.",
        epilog="examples:\n"
        '  echo \'{"prompt": "question : what is two plus two ? answer :"}\' | '
        "lorakit predict --model models/tiny-llama --adapter adapters/math\n"
        "  lorakit predict --model models/minilm --adapter adapters/sentiment --input reviews.jsonl > labels.jsonl",
    )
    add_model_flags(p)
    p.add_argument("--adapter", metavar="DIR", help="an adapter directory (lorakit or PEFT); default: the base alone")
    p.add_argument("--input", default="-", metavar="FILE", help="JSONL (or CSV) rows; - for stdin (default)")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template for 'messages' rows")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default 40)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (row i: seed + i)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per batch (default 8)")
    p.add_argument("--max-length", type=positive_int, help="seq-cls: truncate texts (default: as trained)")
    p.add_argument("--skip-bad-rows", action="store_true", help='write {"line": N, "error": ...} for bad rows')
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped in the model directory")
    add_base_mismatch_flag(p)
    p.set_defaults(run=predict)
