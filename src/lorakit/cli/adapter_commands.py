"""The Hugging Face subcommands of `lorakit`: finetune, merge, inspect, generate.

Each is a short function: check the inputs (a problem there exits 2), then call the core (a failure
there exits 1). `cli.py` adds them to its parser through ADDERS.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class BadInput(Exception):
    """A problem with what the user passed (paths, files, flags): exit code 2."""


def _inputs(fn, *args, **kwargs):
    """Run an input-reading step; lorakit's file/data errors and bad values become BadInput."""
    from ..errors import LoraError

    try:
        return fn(*args, **kwargs)
    except (LoraError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        raise BadInput(str(e)) from None


def _quiet_transformers() -> None:
    """Offline, and no progress bars or load reports: lorakit says what matters itself."""
    from ..hf import models as hf

    hf.offline()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def guarded(name: str):
    """Map a subcommand's outcome to exit codes: 0 ok, 1 runtime failure, 2 bad input."""
    return lambda fn: _guard(name, fn)


def _guard(name: str, fn):
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args) or EXIT_OK
        except BadInput as e:
            print(f"lorakit {name}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print(f"lorakit {name}: interrupted", file=sys.stderr)
            return EXIT_FAILURE
        except Exception as e:  # a runtime failure: say what, not a traceback
            print(f"lorakit {name}: failed: {type(e).__name__}: {e}", file=sys.stderr)
            return EXIT_FAILURE

    run.__name__ = fn.__name__
    return run


# -- finetune --------------------------------------------------------------------------------------

@guarded("finetune")
def cmd_finetune(args: argparse.Namespace) -> int:
    from ..hf import finetune
    from ..config import LoraConfig
    from ..train import TrainConfig

    _quiet_transformers()
    # "q_proj,v_proj" or "q_proj v_proj"; a regex ("re:...") is taken whole, commas and all
    targets = [t for chunk in args.targets for t in ([chunk] if chunk.startswith("re:") else chunk.split(",")) if t]
    job = _inputs(lambda: finetune.FinetuneJob(
        model=args.model, data=args.data, task=args.task, out=args.out, valid=args.valid, targets=targets,
        lora=LoraConfig(rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                        dropout=args.dropout, use_rslora=args.rslora, use_dora=args.use_dora, init=args.init),
        train=TrainConfig(loraplus_ratio=args.loraplus_ratio,
                          epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule,
                          warmup_steps=args.warmup_steps, grad_accum=args.grad_accum, precision=args.precision,
                          device=args.device, seed=args.seed, log_every=args.log_every,
                          checkpoint_every=args.checkpoint_every, fsdp=args.fsdp),
        batch_size=args.batch_size, max_length=args.max_length, valid_fraction=args.valid_fraction,
        skip_bad_rows=args.skip_bad_rows, max_line_bytes=args.max_line_bytes,
        trust_remote_code=args.trust_remote_code, resume=args.resume, overwrite=args.overwrite, quantize=args.quantize))
    setup = _inputs(finetune.prepare, job)
    bad = setup.prepared.bad_rows
    if bad:
        print(f"skipping {len(bad)} bad row(s) (--skip-bad-rows); first: {bad[0]}", file=sys.stderr)
    report = finetune.run(setup, callbacks=[_plain_log()] if args.plain else None)
    from ..train.distributed import is_main

    if not is_main():  # under torchrun, rank 0 reports
        return EXIT_OK
    metric = "accuracy" if job.task == "seq-cls" else "perplexity"
    for when in ("before", "after"):
        values = report[when]
        print(f"{when:<6} valid_loss={values['loss']:.4f} valid_{metric}={values[metric]:.4f}")
    print(f"adapter: {report['adapter']}  (run artifacts: {report['artifacts']})")
    return EXIT_OK


def _plain_log():
    from ..train import PlainLog

    return PlainLog()


# -- inspect ---------------------------------------------------------------------------------------

@guarded("inspect")
def cmd_inspect(args: argparse.Namespace) -> int:
    from ..files import inspect as adapter_info

    info = _inputs(adapter_info.describe, args.adapter)
    print(json.dumps(info, indent=2) if args.json else adapter_info.render(info))
    return EXIT_OK


# -- merge -----------------------------------------------------------------------------------------

@guarded("merge")
def cmd_merge(args: argparse.Namespace) -> int:
    from ..hf import models as hf

    _quiet_transformers()
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out}: exists and is not an empty directory; choose a new --out")
    _inputs(hf.check_model_dir, args.model)
    specs, weights = _adapter_specs(args.adapter), _weights(args.weight)
    if len(specs) == 1 and not weights:
        model, tok, task = _inputs(hf.load_with_adapter, args.model, specs[0][1], task=args.task,
                                   trust_remote_code=args.trust_remote_code)
        what = str(specs[0][1])
    else:
        model, tok, task = _load_named(args.model, specs, args.task, args.trust_remote_code)
        report = _combine(model, specs, weights, args.combine, args.combine_rank)
        what = f"{report.method} of " + ", ".join(f"{w:g}×{n}" for n, w in _weights_for(specs, weights).items())
        print(f"combined ({report.method}): max relative error of ΔW {report.max_relative_error:.3g}")
    n = hf.save_merged(model, tok, out, dtype=args.dtype)
    print(f"merged {n} LoRA modules of {what} into {args.model} ({task}); wrote {out}")
    return EXIT_OK


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
    unknown = sorted(set(weights) - {n for n, _ in specs})
    if unknown:
        raise BadInput(f"--weight names {unknown} match no --adapter; adapters: {[n for n, _ in specs]}")
    return {n: weights.get(n, 1.0) for n, _ in specs}


def _load_named(model_dir, specs, task, trust_remote_code):
    """The base with every adapter loaded under its name (all for the same task)."""
    from ..loading import load_adapters
    from ..hf import models as hf

    tasks = {n: _inputs(hf.read_task, d) for n, d in specs}
    kinds = {t for t, _ in tasks.values()}
    if len(kinds) > 1:
        raise BadInput(f"the adapters are for different tasks: {({n: t for n, (t, _) in tasks.items()})}")
    task = task or kinds.pop()
    if task == "seq-cls":
        raise BadInput("several adapters with classification heads cannot share one model; merge them one at a time")
    model, tok = _inputs(hf.load, model_dir, task, trust_remote_code=trust_remote_code)
    for name, d in specs:
        _inputs(load_adapters, model, d, name=name)
    return model, tok, task


def _combine(model, specs, weights, method, rank):
    """Combine the named adapters into one active adapter "combined"; the originals are dropped."""
    from .. import adapters

    report = _inputs(adapters.combine_adapters, model, _weights_for(specs, weights), "combined",
                     method=method, rank=rank)
    adapters.set_adapter(model, "combined")
    for name, _ in specs:
        adapters.delete_adapter(model, name)
    return report


# -- generate --------------------------------------------------------------------------------------

@guarded("generate")
def cmd_generate(args: argparse.Namespace) -> int:
    from ..loading import load_adapters
    from ..hf import models as hf

    _quiet_transformers()
    if args.max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens {args.max_new_tokens} is invalid: expected >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise BadInput("--temperature must be >= 0 and --top-p in (0, 1]")
    specs, weights = _adapter_specs(args.adapter or []), _weights(args.weight)
    if args.compare and not specs:
        raise BadInput("--compare needs --adapter")
    for name, d in specs:
        task, _ = _inputs(hf.read_task, d)
        if task != "causal-lm":
            raise BadInput(f"{d} is a {task} adapter; generate needs a causal-lm adapter")
    model, tok = _inputs(hf.load, args.model, "causal-lm", trust_remote_code=args.trust_remote_code)
    if args.device:
        model.to(args.device)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed)
    if args.compare:
        print("--- base ---")
        print(args.prompt + hf.generate(model, tok, args.prompt, **options))
    if len(specs) == 1 and not weights:
        _inputs(load_adapters, model, specs[0][1])
        if args.compare:
            print("--- base + adapter ---")
    elif specs:
        from .. import adapters

        for name, d in specs:
            _inputs(load_adapters, model, d, name=name)
        if not weights:  # one completion per adapter, on the one shared base
            for name, _ in specs:
                with adapters.use_adapter(model, name):
                    print(f"--- adapter {name} ---")
                    print(args.prompt + hf.generate(model, tok, args.prompt, **options))
            return EXIT_OK
        report = _combine(model, specs, weights, args.combine, args.combine_rank)
        print(f"--- combined ({report.method}, max relative error of ΔW {report.max_relative_error:.3g}) ---")
    print(args.prompt + hf.generate(model, tok, args.prompt, **options))
    return EXIT_OK


# -- the parsers -----------------------------------------------------------------------------------

def add_finetune(subparsers) -> None:
    """Flags of `lorakit finetune`."""
    p = subparsers.add_parser(
        "finetune", help="fine-tune a local Hugging Face model with LoRA on a JSONL/CSV file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a LoRA adapter for a local causal LM or sequence classifier.\n\n"
                    "data rows (JSONL, or CSV with a header):\n"
                    '  causal-lm  {"text": ...}  or  {"prompt": ..., "completion": ...}  (loss on the completion only)\n'
                    '  seq-cls    {"text": ..., "label": "positive" | 3}\n\n'
                    "Bad rows are listed as file:line and the run does not start unless --skip-bad-rows.\n"
                    "OUT becomes a PEFT-format adapter directory; metrics, plot, checkpoint go to OUT/run/.",
        epilog="example: lorakit finetune --model models/tiny-llama --data train.jsonl --task causal-lm --out adapters/a1")
    p.add_argument("--model", required=True, metavar="DIR", help="the base model directory (local Hugging Face format)")
    p.add_argument("--data", required=True, metavar="FILE", help="training rows: .jsonl or .csv/.tsv")
    p.add_argument("--valid", metavar="FILE", help="validation rows (default: hold out --valid-fraction of --data)")
    p.add_argument("--task", required=True, choices=["causal-lm", "seq-cls"])
    p.add_argument("--out", required=True, metavar="DIR", help="the adapter directory to write")
    g = p.add_argument_group("LoRA")
    g.add_argument("--targets", nargs="+", default=["all-linear"], metavar="T",
                   help="modules to adapt: names, suffixes (q_proj), 're:<regex>' or all-linear (default)")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    g.add_argument("--alpha", type=float, help="LoRA alpha (default 2 * rank)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA branch (default 0)")
    g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    g.add_argument("--use-dora", action="store_true", help="DoRA: a trained magnitude per output row (linear layers)")
    g.add_argument("--init", choices=["kaiming", "gaussian", "pissa", "olora"], default="kaiming",
                   help="how A and B start (default kaiming); pissa/olora take them from W and adjust the base; "
                        "the saved adapter is then a rank-2r LoRA for the original model (docs/variants.md)")
    g.add_argument("--quantize", choices=["nf4", "int8"], help="QLoRA: store the wrapped layers' frozen weights "
                   "4-bit NF4 (needs torchao) or int8")
    g.add_argument("--loraplus-ratio", type=float, metavar="R",
                   help="LoRA+: lora_B learns at R x the learning rate (the paper suggests 16)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=3, help="passes over the data (default 3)")
    g.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    g.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    g.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step (default 1)")
    g.add_argument("--max-length", type=int, default=256, help="truncate rows to this many tokens (default 256)")
    g.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="linear", help="default linear")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    g.add_argument("--seed", type=int, default=0, help="seeds the split, shuffling, head init and dropout")
    g.add_argument("--log-every", type=int, default=10, help="optimizer steps between log lines (default 10)")
    g.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: every epoch)")
    g.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace what is in OUT")
    g.add_argument("--plain", action="store_true", help="plain log lines instead of the dashboard")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the frozen base with FSDP2 instead of DDP (docs/distributed.md)")
    g = p.add_argument_group("data")
    g.add_argument("--valid-fraction", type=float, default=0.1, help="held out when there is no --valid (default 0.1)")
    g.add_argument("--skip-bad-rows", action="store_true", help="train without the bad rows instead of refusing")
    g.add_argument("--max-line-bytes", type=int, default=1 << 20, help="longest accepted line (default 1 MiB)")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped in the model directory")
    p.set_defaults(run=cmd_finetune)


def add_inspect(subparsers) -> None:
    """Flags of `lorakit inspect`."""
    p = subparsers.add_parser(
        "inspect", help="show what an adapter holds (lorakit- or PEFT-made)",
        description="Show an adapter's config, targets, per-module shapes and ranks, parameter count, file size "
                    "and the base weight shapes it expects. Reads only JSON and safetensors.")
    p.add_argument("adapter", help="adapter directory, its adapter_model.safetensors, or a lorakit layer .safetensors")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(run=cmd_inspect)


def add_merge(subparsers) -> None:
    """Flags of `lorakit merge`."""
    p = subparsers.add_parser(
        "merge", help="merge an adapter into its base model and save a plain transformers model",
        description="Load the base model and adapter, fold the adapter into the weights (in fp32), and write a "
                    "directory that transformers' AutoModel*.from_pretrained(OUT) loads: weights, config, tokenizer.")
    p.add_argument("--model", required=True, metavar="DIR", help="the base model directory (local Hugging Face format)")
    p.add_argument("--adapter", required=True, action="append", metavar="[NAME=]DIR",
                   help="the adapter directory (lorakit or PEFT); repeat to merge several, combined with --weight")
    _add_combine_flags(p)
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model (new or empty)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast the merged weights (default: as stored)")
    p.add_argument("--task", choices=["causal-lm", "seq-cls"], help="default: what the adapter directory records")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped in the model directory")
    p.set_defaults(run=cmd_merge)


def add_generate(subparsers) -> None:
    """Flags of `lorakit generate`."""
    p = subparsers.add_parser(
        "generate", help="generate text from a causal LM, with or without an adapter",
        description="Complete a prompt with a local causal LM; greedy by default, sampling with --temperature > 0. "
                    "With --compare, print the base model's completion and then the adapter's.")
    p.add_argument("--model", required=True, metavar="DIR", help="the base model directory")
    p.add_argument("--adapter", action="append", metavar="[NAME=]DIR",
                   help="an adapter directory to load (lorakit or PEFT); repeat for one completion per adapter, "
                        "or with --weight for one completion of their weighted combination")
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
    p.set_defaults(run=cmd_generate)


def _add_combine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weight", action="append", metavar="NAME=W",
                   help="weight of adapter NAME in a combination (default 1 for each); repeatable")
    p.add_argument("--combine", choices=["cat", "svd", "linear"], default="cat",
                   help="how several adapters combine: cat (exact, ranks add up; default), svd (to --combine-rank), "
                        "linear (equal ranks, approximate)")
    p.add_argument("--combine-rank", type=int, help="the rank of an svd combination")


ADDERS = [add_finetune, add_merge, add_inspect, add_generate]  # cli.py lists these in SUBCOMMANDS
