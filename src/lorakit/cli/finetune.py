"""`lorakit finetune`: LoRA-train a local Hugging Face model on a JSONL/CSV file (the job is hf/finetune.py)."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

from ..config import INITS
from ..hf import finetune as job_module
from ..hf import models as hf
from ..hf.answer_metrics import VALID as VALID_METRICS
from ..hf.answers import MAX_NEW_TOKENS
from ..hf.data import MAX_LINE_BYTES
from ..train.config import PRECISIONS, SCHEDULES
from ..train.trainer import Callback
from ..variants.quant import FORMATS as QUANT_FORMATS
from . import finetune_align as align
from . import finetune_speed, out_dir, runfile
from . import finetune_start as start
from .common import add_model_flags, inputs, model_dir, positive_int, quiet_transformers


def finetune(args: argparse.Namespace) -> int:
    """Run `lorakit finetune`: build the job from the flags, prepare it (input errors exit 2), train, report."""
    from ..train.distributed import is_main
    from ..ui.progress import Progress

    quiet_transformers()
    # before the job resolves --model (a hub id may download) and the slow part: a missing tracker fails here
    callbacks = _callbacks(args)
    align.check(args)  # a flag of another task, or LoRA flags beside --init-adapter: before anything is resolved
    # resolved as apply_lora reads it, so that the run file records it: all-linear, or no modules beside parameters
    # (PEFT's rule); an --init-adapter brings its own targets
    if args.targets is None and args.init_adapter is None:
        args.targets = [] if args.target_parameters else ["all-linear"]
    job = inputs(_job, args)
    out = Path(job.out)
    out_dir.check_start(out, job.resume, job.overwrite)  # advice that fits what OUT holds
    if job.resume:  # the same run, or exit 2 naming what changed, before anything loads
        inputs(out_dir.check_same_run, out, args, args.parser, job.train.to_dict())
    previous = start.make_room(job) if is_main() else None  # --overwrite: the previous run set aside
    # after Ctrl-C: the command that resumes (once there is a checkpoint), and where the previous run went
    args.interrupt_hint = functools.partial(start.interrupt_hint, out, previous)
    setup = start.prepare(job, previous, Progress())
    from ..align import job as align_job  # the losses and the serving engine, once the inputs are known good

    if is_main():  # every flag's resolved value: `--config OUT/run/run.toml --out NEW` repeats this run
        runfile.write(out / job_module.RUN_DIR / out_dir.RUN_FILE, args, args.parser, skip=out_dir.NOT_RECORDED)
        start.say_setup(setup)  # packing and checkpointing, before the first step
        if job.task in hf.ALIGN_TASKS:
            print(align_job.reference_line(setup), flush=True)
    bad = setup.prepared.bad_rows
    if bad:
        print(f"skipping {len(bad)} bad row(s) (--skip-bad-rows); first: {bad[0]}", file=sys.stderr)
    run = align_job.run if job.task in hf.ALIGN_TASKS else job_module.run
    report = run(setup, callbacks=callbacks)
    if not is_main():  # under torchrun, rank 0 reports
        return 0
    start.finish(job, previous)
    if job.task in hf.ALIGN_TASKS:
        align.print_report(report)
    else:
        _print_report(report, job.task)
    print(f"adapter: {report['adapter']}  (run artifacts: {report['artifacts']})")
    return 0


def _job(args: argparse.Namespace) -> job_module.FinetuneJob:
    """The finetune job the flags describe."""
    from ..config import LoraConfig
    from ..train import TrainConfig

    return job_module.FinetuneJob(
        model=model_dir(args),
        data=args.data,
        task=args.task,
        out=args.out,
        valid=args.valid,
        targets=_rules(args.targets) if args.targets is not None else None,  # None: --init-adapter's own
        target_parameters=_rules(args.target_parameters or []),
        lora=LoraConfig(
            rank=args.rank,
            alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
            dropout=args.dropout,
            use_rslora=args.rslora,
            use_dora=args.use_dora,
            init=args.init,
        ),
        train=TrainConfig(
            loraplus_ratio=args.loraplus_ratio,
            epochs=args.epochs,
            lr=args.lr,
            weight_decay=args.weight_decay,
            schedule=args.schedule,
            warmup_steps=args.warmup_steps,
            grad_accum=args.grad_accum,
            precision=args.precision,
            device=args.device,
            seed=args.seed,
            log_every=args.log_every,
            checkpoint_every=args.checkpoint_every,
            fsdp=args.fsdp,
            max_steps=args.max_steps,
            eval_every=args.eval_every,
            offload_activations=args.offload_activations,
        ),
        batch_size=args.batch_size,
        max_length=args.max_length,
        valid_fraction=args.valid_fraction,
        skip_bad_rows=args.skip_bad_rows,
        max_line_bytes=args.max_line_bytes,
        trust_remote_code=args.trust_remote_code,
        resume=args.resume,
        overwrite=args.overwrite,
        quantize=args.quantize,
        chat_template=args.chat_template,
        pack=args.pack,
        gradient_checkpointing=args.gradient_checkpointing,
        reference=args.reference,
        eval_metrics=args.eval_metric or (),
        eval_metric_rows=args.eval_metric_rows,
        eval_max_new_tokens=args.eval_max_new_tokens,
        align=align.config(args),
        init_adapter=args.init_adapter,
        ref_adapter=args.ref_adapter,
        speed=finetune_speed.config(args),
    )


def _rules(chunks: list[str]) -> list[str]:
    """Target rules from the command line: "q_proj,v_proj" or "q_proj v_proj"; a regex ("re:...") is taken whole,
    commas and all."""
    return [t for chunk in chunks for t in ([chunk] if chunk.startswith("re:") else chunk.split(",")) if t]


def _print_report(report: dict[str, Any], task: str) -> None:
    """The valid metrics before and after training, and what --pack saved."""
    metric = "accuracy" if task == "seq-cls" else "perplexity"
    for when in ("before", "after"):
        values = report[when]
        answers = "".join(f" valid_{k}={v:.4f}" for k, v in values.items() if k not in ("loss", metric))
        print(f"{when:<6} valid_loss={values['loss']:.4f} valid_{metric}={values[metric]:.4f}{answers}")
    packed = report.get("packing")
    if packed:  # --pack: what it saved
        print(
            f"packing: {packed['rows_before']} rows -> {packed['rows_after']}, padding "
            f"{100 * packed['padding_fraction_unpacked']:.1f}% -> {100 * packed['padding_fraction_packed']:.1f}% "
            "of the tokens"
        )


def _callbacks(args: argparse.Namespace) -> list[Callback] | None:
    """The reporter (--plain or the automatic choice) and, with --log, the tracker (TensorBoard, MLflow, W&B)."""
    from ..train import PlainLog, auto_reporter

    if args.log == "none":
        return [PlainLog()] if args.plain else None  # None: the trainer picks the reporter on rank 0
    return [PlainLog() if args.plain else auto_reporter(), _tracker(args)]  # both report on rank 0 only


def _tracker(args: argparse.Namespace) -> Callback:
    """The --log tracker, made now: a missing library fails here, naming the pip command, before anything loads."""
    from ..train import MLflow, TensorBoard, WandB

    if args.log == "tensorboard":
        return TensorBoard()
    params = {k: v for k, v in runfile.resolved(args, args.parser).items() if k not in out_dir.NOT_RECORDED}
    return MLflow(params) if args.log == "mlflow" else WandB(params)


def add_finetune(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Flags of `lorakit finetune`."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a local Hugging Face model with LoRA on a JSONL/CSV file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a LoRA adapter for a local causal LM or sequence classifier.\n\n"
        f"{_row_forms()}\n\n"
        "Bad rows are listed as file:line and the run does not start unless --skip-bad-rows.\n"
        "OUT becomes a PEFT-format adapter directory; metrics, plot, checkpoint go to OUT/run/.",
        epilog="example: lorakit finetune --model models/tiny-llama --data train.jsonl --task causal-lm "
        "--out adapters/a1",
    )
    add_model_flags(p)
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE|DIR",
        help="training rows: .jsonl or .csv/.tsv, or a directory of .parquet/.jsonl/.csv files",
    )
    p.add_argument("--valid", metavar="FILE|DIR", help="validation rows (default: hold out --valid-fraction of --data)")
    p.add_argument(
        "--task",
        required=True,
        choices=hf.TRAIN_TASKS,
        help="causal-lm, seq-cls (supervised), dpo (preference pairs) or grpo (prompts, sampled completions, "
        "rewards); docs/preference.md",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the adapter directory to write")
    g = p.add_argument_group("LoRA")
    _add_lora_args(g)
    g = p.add_argument_group("training")
    _add_training_args(g)
    _add_steps_args(g)
    g = p.add_argument_group("data")
    _add_data_args(g)
    align.add_args(p)
    finetune_speed.add_args(p)
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped in the model directory")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML run file of these flags (keys: rank, max_length, ...; paths relative to it); flags given "
        "here override it; every run records its own in OUT/run/run.toml",
    )
    p.set_defaults(run=finetune, parser=p, recorded_run=out_dir.recorded_run)


def _row_forms() -> str:
    """The help text's list of data rows, one line per form each task takes (examples.FORMS)."""
    from ..hf.examples import form_lines

    lines = ["data rows (JSONL, CSV/TSV with a header, or a directory of Parquet/JSONL/CSV files), one form per row:"]
    for task in hf.TRAIN_TASKS:
        lines += [f"  {task if i == 0 else '':<10} {line}" for i, line in enumerate(form_lines(task))]
    return "\n".join(lines)


def _add_lora_args(g: argparse._ArgumentGroup) -> None:
    """finetune's LoRA flags: targets, rank, alpha, dropout, variants, quantisation, LoRA+."""
    g.add_argument(
        "--targets",
        nargs="+",
        metavar="T",
        help="modules to adapt: names, suffixes (q_proj), 're:<regex>' or all-linear (the default, unless "
        "--target-parameters is given: then no modules unless named here)",
    )
    g.add_argument(
        "--target-parameters",
        nargs="+",
        metavar="P",
        help="parameters to adapt, as PEFT's target_parameters: MODULE.PARAM names or suffixes "
        "(mlp.experts.gate_up_proj), 're:<regex>', or all-experts (every 3-D expert weight of a mixture-of-experts "
        "model; routers only when named); what each rule matched is printed before training",
    )
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    g.add_argument("--alpha", type=float, help="LoRA alpha (default 2 * rank)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA branch (default 0)")
    g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    g.add_argument("--use-dora", action="store_true", help="DoRA: a trained magnitude per output row (linear layers)")
    g.add_argument(
        "--init",
        choices=INITS,
        default="kaiming",
        help="how A and B start (default kaiming); pissa/olora take them from W and adjust the base; "
        "the saved adapter is then a rank-2r LoRA for the original model (docs/variants.md)",
    )
    g.add_argument(
        "--quantize",
        choices=QUANT_FORMATS,
        help="QLoRA: store the wrapped layers' frozen weights 4-bit NF4 (needs torchao) or int8",
    )
    g.add_argument(
        "--loraplus-ratio",
        type=float,
        metavar="R",
        help="LoRA+: lora_B learns at R x the learning rate (the paper suggests 16)",
    )


def _add_training_args(g: argparse._ArgumentGroup) -> None:
    """finetune's training flags: epochs, learning rate and schedule, batches, precision, logs."""
    g.add_argument("--epochs", type=int, default=3, help="passes over the data (default 3)")
    g.add_argument("--lr", "--learning-rate", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    g.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    g.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step (default 1)")
    g.add_argument("--max-length", type=int, default=256, help="truncate rows to this many tokens (default 256)")
    g.add_argument("--schedule", choices=SCHEDULES, default="linear", help="default linear")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--precision", choices=PRECISIONS, default="fp32")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    g.add_argument("--seed", type=int, default=0, help="seeds the split, shuffling, head init and dropout")
    g.add_argument("--log-every", type=int, default=10, help="optimizer steps between log lines (default 10)")
    g.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: every epoch)")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT from its last checkpoint, with the settings it recorded "
        "(OUT/run/run.toml): `--out OUT --resume` is enough",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what is in OUT: it is moved to OUT/.previous-<time>/ as the run starts and deleted when "
        "the run finishes (kept if the run is interrupted)",
    )
    g.add_argument("--plain", action="store_true", help="plain log lines instead of the dashboard")


def _add_steps_args(g: argparse._ArgumentGroup) -> None:
    """finetune's flags for step-based runs, evaluation every N steps, the forgetting monitor, TensorBoard,
    FSDP and gradient checkpointing."""
    g.add_argument(
        "--max-steps",
        type=positive_int,
        metavar="N",
        help="stop after N optimizer steps; overrides --epochs (the data is read again as often as needed)",
    )
    g.add_argument(
        "--eval-every",
        type=positive_int,
        metavar="N",
        help="evaluate every N optimizer steps (default: at epoch ends only; epoch ends always evaluate)",
    )
    _add_eval_metric_args(g)
    g.add_argument(
        "--reference",
        metavar="FILE",
        help="plain text the model should not forget: every evaluation reports kl_ref, the mean per-token "
        "KL(adapted || base) on it, in chunks of --max-length tokens (causal-lm)",
    )
    g.add_argument(
        "--log",
        choices=("none", "tensorboard", "mlflow", "wandb"),
        default="none",
        help="also log the metrics to a tracker: tensorboard (OUT/run/tensorboard/; pip install "
        "'lorakit[tensorboard]'), mlflow (MLFLOW_TRACKING_URI, else a file store in OUT/run/mlruns/) or wandb "
        "(offline in OUT/run/wandb/ unless WANDB_MODE says otherwise); pip install 'lorakit[track]' for both",
    )
    g.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the frozen base with FSDP2 instead of DDP (docs/distributed.md)",
    )
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each layer's activations in the backward: less memory, about one more forward per step",
    )


def _add_eval_metric_args(g: argparse._ArgumentGroup) -> None:
    """finetune's answer metrics at each evaluation (hf/answers.py)."""
    g.add_argument(
        "--eval-metric",
        action="append",
        metavar="NAME",
        help=f"causal-lm: at every evaluation, generate the answers of the first --eval-metric-rows validation rows "
        f"(greedy) and score them: {VALID_METRICS}; repeatable or comma-separated (as eval --metric); logged as "
        "valid_NAME, with the first 3 rows' prompt, reference, generation and scores in metrics.jsonl",
    )
    g.add_argument(
        "--eval-metric-rows",
        type=positive_int,
        default=16,
        metavar="N",
        help="with --eval-metric: validation rows answered per evaluation (default 16: generation is slow)",
    )
    g.add_argument(
        "--eval-max-new-tokens",
        type=positive_int,
        default=MAX_NEW_TOKENS,
        metavar="N",
        help=f"with --eval-metric: the longest answer generated, in tokens (default {MAX_NEW_TOKENS})",
    )


def _add_data_args(g: argparse._ArgumentGroup) -> None:
    """finetune's data flags: the validation split, bad rows, line size, chat template, packing."""
    g.add_argument("--valid-fraction", type=float, default=0.1, help="held out when there is no --valid (default 0.1)")
    g.add_argument("--skip-bad-rows", action="store_true", help="train without the bad rows instead of refusing")
    g.add_argument("--max-line-bytes", type=int, default=MAX_LINE_BYTES, help="longest accepted line (default 1 MiB)")
    g.add_argument(
        "--chat-template",
        metavar="FILE",
        help="a Jinja chat template for chat rows (replaces the tokenizer's own; saved beside the adapter)",
    )
    g.add_argument(
        "--pack",
        action="store_true",
        help="causal-lm: pack several training rows into each --max-length row (attention stays within a row's "
        "own text); less padding, fewer steps per epoch; validation stays unpacked",
    )
