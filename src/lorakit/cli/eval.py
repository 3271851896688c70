"""`lorakit eval`: score the base and adapters on a data file (hf/evaluate.py): a table, or one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..hf import data
from ..hf import models as hf
from ..hf.answer_metrics import VALID as VALID_METRICS
from ..hf.answer_metrics import parse_metrics
from ..hf.answers import MAX_NEW_TOKENS
from ..hf.rows import MAX_LINE_BYTES
from .adapter_specs import adapter_specs
from .common import (
    PARAM_FLAGS,
    BadInput,
    add_base_mismatch_flag,
    add_model_flags,
    base_check,
    inputs,
    model_dir,
    positive_int,
    quiet_transformers,
)


def evaluate(args: argparse.Namespace) -> int:
    """Run `lorakit eval`: one table (or one JSON object) of the base's and each adapter's metrics."""
    from ..hf import evaluate as ev
    from ..ui.progress import Progress

    quiet_transformers()
    inputs(parse_metrics, args.metric or [])  # a bad metric before anything loads
    specs = adapter_specs(args.adapter or [])
    model = model_dir(args)
    progress = Progress()
    setup = inputs(
        _prepare_eval,
        model,
        dict(specs),
        args.data,
        task=args.task,
        batch_size=args.batch_size,
        max_length=args.max_length,
        skip_bad_rows=args.skip_bad_rows,
        max_line_bytes=args.max_line_bytes,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        chat_template=args.chat_template,
        metrics=args.metric or [],
        max_new_tokens=args.max_new_tokens,
        **base_check(args),
        progress=progress,
    )
    if setup.bad_rows:
        print(
            f"skipping {len(setup.bad_rows)} bad row(s) (--skip-bad-rows); first: {setup.bad_rows[0]}", file=sys.stderr
        )
    report = ev.run(setup, progress)
    if args.json:
        print(json.dumps(report))
        return 0
    _print_tables(report)
    return 0


def _prepare_eval(*args: Any, **kwargs: Any) -> Any:
    """hf.evaluate.prepare, its bad-row refusal worded for scoring (eval trains nothing)."""
    from ..hf import evaluate as ev

    try:
        return ev.prepare(*args, **kwargs)
    except data.BadRowsError as e:
        flag = PARAM_FLAGS["skip_bad_rows"]
        raise BadInput(
            f"{len(e.bad_rows)} bad row(s); fix them, or pass {flag} to score without them:\n{e.listing}"
        ) from None


def _print_tables(report: dict[str, Any]) -> None:
    """The metrics table, and a confusion matrix per seq-cls adapter: rich on a terminal, plain text piped."""
    from rich.console import Console

    from ..ui.tables import table, to_text

    seq_cls = report["task"] == "seq-cls"
    title = f"{report['data']}: {report['rows']} rows, {report['task']}, max_length {report['max_length']}"
    answer = report.get("metrics", [])  # answer metrics: a column each
    columns = ("model", "accuracy", "macro-F1", "loss") if seq_cls else ("model", "loss", "perplexity", "tokens")
    t = table(*columns, *answer, right=(*columns[1:], *answer))
    if report["base"] is None:
        t.add_row("base", "-", "-", "-")
    else:
        b = report["base"]
        t.add_row("base", f"{b['loss']:.4f}", f"{b['perplexity']:.3f}", str(b["tokens"]), *_answer_cells(b, answer))
    for name, m in report["adapters"].items():
        if seq_cls:
            t.add_row(name, f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}", f"{m['loss']:.4f}")
        else:
            cells = (f"{m['loss']:.4f}", f"{m['perplexity']:.3f}", str(m["tokens"]), *_answer_cells(m, answer))
            t.add_row(name, *cells)
    parts: list[Any] = [title, t]
    if report.get("note"):
        parts.append(f"base: {report['note'].removeprefix('seq-cls: ')}")
    for name, m in report["adapters"].items() if seq_cls else ():
        labels = m["labels"]
        c = table("true \\ predicted", *labels, right=tuple(labels))
        for label, row in zip(labels, m["confusion"], strict=True):
            c.add_row(label, *map(str, row))
        parts += ["", f"confusion matrix of {name} (rows: true label, columns: predicted)", c]
    if sys.stdout.isatty():
        console = Console(highlight=False, markup=False)
        for p in parts:
            console.print(p)
    else:
        print(to_text(*parts))


def _answer_cells(scored: dict[str, Any], metrics: list[str]) -> list[str]:
    """The answer metrics' means of one model, as table cells."""
    return [f"{scored[m]:.4f}" for m in metrics]


def add_eval(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Flags of `lorakit eval`."""
    p = subparsers.add_parser(
        "eval",
        help="score the base model and adapters on a data file (loss/perplexity, or accuracy/F1/confusion)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score the base model and each adapter on one data file, read and checked as finetune reads it.\n\n"
        "  causal-lm  mean loss per labelled token (completions only for prompt/completion rows) and perplexity\n"
        "  seq-cls    accuracy, macro-F1 and a confusion matrix (rows: true label, columns: predicted), with the\n"
        "             adapter's label names; the base is not scored (its classification head is untrained)\n"
        "  --metric   causal-lm: each row's answer, generated greedily from its prompt (prompt/completion,\n"
        "             instruction/output, or a chat's turns before its last assistant message, through the chat\n"
        "             template), scored against its reference answer; the mean over the rows, a column each:\n"
        "               exact_match    the generation equals the reference (both stripped of whitespace)\n"
        "               contains       the reference occurs in the generation\n"
        "               regex:PATTERN  re.search(PATTERN) matches the stripped generation (anchor: ^...$)\n"
        "               json_valid     the stripped generation parses as JSON (no reference needed)\n\n"
        "Causal-lm adapters share one base (loaded by name, switched in turn). The task comes from the\n"
        "adapters' lorakit_task.json (all must agree). A table on stdout, or one JSON object with --json:\n"
        '  {"task": ..., "base": {...} | null, "adapters": {"NAME": {...}}, ...}\n'
        "Progress goes to stderr.",
        epilog="examples:\n"
        "  lorakit eval --model models/tiny-llama --adapter math=adapters/math --data valid.jsonl\n"
        "  lorakit eval --model models/minilm --adapter adapters/sentiment --data valid.csv --json\n"
        "  lorakit eval --model models/tiny-chat --adapter adapters/math --data valid.jsonl --metric exact_match "
        "--metric 'regex:^[0-9]+$'",
    )
    add_model_flags(p)
    p.add_argument(
        "--adapter",
        action="append",
        metavar="[NAME=]DIR",
        help="an adapter directory (lorakit or PEFT); repeatable; NAME defaults to the folder's name",
    )
    p.add_argument("--data", required=True, metavar="FILE", help="the rows to score: JSONL or CSV, as finetune takes")
    p.add_argument("--task", choices=hf.TASKS, help="default: what the adapters record (causal-lm without adapters)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward pass (default 8)")
    p.add_argument(
        "--max-length",
        type=positive_int,
        help="truncate rows to this many tokens (default: as the adapter was trained)",
    )
    p.add_argument("--skip-bad-rows", action="store_true", help="score without the bad rows instead of refusing")
    p.add_argument(
        "--chat-template",
        metavar="FILE",
        help="a Jinja chat template for 'messages' rows (default: the one the adapters trained with, saved beside "
        "them, else the tokenizer's)",
    )
    p.add_argument("--max-line-bytes", type=positive_int, default=MAX_LINE_BYTES, help=argparse.SUPPRESS)
    _add_metric_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped in the model directory")
    add_base_mismatch_flag(p)
    p.set_defaults(run=evaluate)


def _add_metric_args(p: argparse.ArgumentParser) -> None:
    """eval's answer-metric flags: --metric and --max-new-tokens."""
    p.add_argument(
        "--metric",
        action="append",
        metavar="NAME",
        help=f"causal-lm: score greedy answers against the rows' references: {VALID_METRICS}; repeatable or "
        "comma-separated (regex:PATTERN takes the rest of its value, commas included)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=MAX_NEW_TOKENS,
        help=f"with --metric: the longest answer generated, in tokens (default {MAX_NEW_TOKENS})",
    )
