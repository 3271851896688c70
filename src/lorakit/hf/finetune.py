"""Fine-tune a local Hugging Face model with LoRA on a JSONL/CSV file: the job behind `lorakit finetune`.

    job = FinetuneJob(model="models/tiny-llama", data="train.jsonl", task="causal-lm", out="adapters/run1")
    setup = prepare(job)            # model, tokenizer, data: every input problem surfaces here
    report = run(setup)             # trainer + dashboard; writes the adapter to job.out

`job.out` becomes a PEFT-format adapter directory (plus `lorakit_task.json` with the task and label
names, and `chat_template.jinja` when it trained on chat rows: `chat.load_template` reads it); the run's
artifacts (metrics, plot, checkpoint, best adapter, report) go to `job.out/run/`.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from ..config import LoraConfig
from ..files.atomic import write_json
from ..model import apply_lora, lora_layers, trainable_parameters
from ..saving import save_adapters
from ..target_report import describe_targets
from ..train import TrainConfig, Trainer, TrainResult, accuracy, perplexity
from ..train.distributed import is_main
from ..train.forgetting import ReferenceKL
from ..train.trainer import Callback
from ..ui.progress import Progress, quiet
from ..variants.quant import FORMATS as QUANT_FORMATS
from ..variants.quant import quantize_base
from . import answers, chat, checkpointing, data, finetune_align, finetune_checks, packing, speed
from . import models as hf
from .answer_metrics import parse_metrics
from .data import MAX_LINE_BYTES
from .finetune_align import AlignConfig
from .reference_text import reference_text_loader

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

RUN_DIR = "run"
DATA_CACHE = "data-cache"
REPORT = "finetune_report.json"


@dataclass(frozen=True)
class FinetuneJob:
    """Everything a fine-tuning run needs; paths are local."""

    model: str | Path
    data: str | Path
    task: str
    out: str | Path
    valid: str | Path | None = None
    # modules and parameters to adapt, as apply_lora reads them: targets None (or empty) is all-linear unless
    # parameters are targeted (PEFT's target_modules=None with target_parameters); target_parameters: rules, re:,
    # "all-experts"
    targets: Sequence[str] | None = None
    target_parameters: Sequence[str] = ()
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(rank=8, alpha=16.0))
    train: TrainConfig = field(default_factory=TrainConfig)
    batch_size: int = 8
    max_length: int = 256
    valid_fraction: float = 0.1
    skip_bad_rows: bool = False
    max_line_bytes: int = MAX_LINE_BYTES
    trust_remote_code: bool = False
    resume: bool = False
    overwrite: bool = False
    quantize: str | None = None  # one of variants.quant.FORMATS: QLoRA, the wrapped layers' frozen weights quantised
    # -- chat data (H1) --
    chat_template: str | Path | None = None  # a Jinja file for chat rows, for a tokenizer without a template
    # -- memory and throughput (hf/packing.py, hf/checkpointing.py) --
    pack: bool = False  # causal-lm: several training examples per row, attention kept within each example
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward instead of keeping them
    # forgetting monitor (train/forgetting.py): a plain text file whose KL(adapted || base) every evaluation reports
    reference: str | Path | None = None
    # answer metrics (answer_metrics.py specs): every evaluation generates the first eval_metric_rows validation
    # rows' answers and scores them (answers.AnswerProbe)
    eval_metrics: Sequence[str] = ()
    eval_metric_rows: int = 16
    eval_max_new_tokens: int = answers.MAX_NEW_TOKENS
    # -- after SFT: tasks "dpo" and "grpo" (finetune_align.py; lorakit.align.job trains them) --
    align: AlignConfig | None = None  # a DPOConfig (dpo) or GRPOConfig (grpo); None: the task's defaults
    init_adapter: str | Path | None = None  # the trained adapter starts as this one (its LoRA settings, not lora=)
    ref_adapter: str | Path | None = None  # the frozen reference, loaded as adapter "reference"
    speed: speed.SpeedConfig = field(default_factory=speed.SpeedConfig)  # loss, fused blocks, compile (speed.py)

    def __post_init__(self) -> None:
        if self.task not in hf.TRAIN_TASKS:
            raise ValueError(f"task={self.task!r} is invalid: expected one of {', '.join(hf.TRAIN_TASKS)}")
        object.__setattr__(self, "align", finetune_align.check_align(self.task, self.align, self.ref_adapter))
        finetune_align.check_adapter_options(self)
        for name in ("batch_size", "max_length", "eval_metric_rows", "eval_max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected an int >= 1")
        if self.reference is not None and self.task != "causal-lm":
            raise ValueError(f"reference={str(self.reference)!r} measures next-token KL: it needs task='causal-lm'")
        if self.quantize is not None and self.quantize not in QUANT_FORMATS:
            raise ValueError(
                f"quantize={self.quantize!r} is invalid: expected one of {', '.join(QUANT_FORMATS)} or None"
            )
        if self.pack and self.task != "causal-lm":
            raise ValueError(f"pack=True is for task 'causal-lm' (several texts per row); got {self.task!r}")
        answers.check_task(parse_metrics(self.eval_metrics), self.task)


@dataclass
class Setup:
    """A job made concrete: the LoRA-wrapped model, its tokenizer, the tokenized data."""

    job: FinetuneJob
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    prepared: data.Prepared
    train_loader: DataLoader[data.Encoded]
    valid_loader: DataLoader[data.Encoded]
    packing: dict[str, Any] | None = None  # what packing saved (packing.summary), when the job packs
    reference_loader: DataLoader[Any] | None = None  # job.reference in chunks of max_length tokens
    answer_probe: answers.AnswerProbe | None = None  # job.eval_metrics on the first validation rows
    matched: list[str] = field(default_factory=list)  # what each target rule selected (target_report), one line each
    speed: speed.Resolved = field(default_factory=speed.Resolved)  # job.speed resolved


def prepare(job: FinetuneJob, progress: Progress | None = None) -> Setup:
    """Check the output dir, load the tokenizer, read and tokenize the data, load and wrap the model.

    Raises lorakit's file/data errors or ValueError for anything wrong with the inputs; `out` must be new or
    empty (hf.OutputDirNotEmpty) unless the job resumes or overwrites. `job.pack` packs the training rows
    (packing.py, reported on `progress`); `job.gradient_checkpointing` turns it on (checkpointing.py).
    `progress` shows each step.
    """
    progress = progress or quiet()
    out = Path(job.out)
    run_dir = out / RUN_DIR
    finetune_checks.check_out(out, run_dir, resume=job.resume, overwrite=job.overwrite)
    hf.check_task(job.model, hf.model_task(job.task), trust_remote_code=job.trust_remote_code)  # model, then data
    finetune_checks.check_input_paths(job)  # before the tokenizer and the weights load: a typo in a path costs no wait
    with progress.task(f"loading the tokenizer of {job.model}"):
        tok = hf.load_tokenizer(job.model, trust_remote_code=job.trust_remote_code)
    cache = run_dir / DATA_CACHE  # a data directory's tokenized rows (ondisk.py); a data file needs none
    made = [p for p in (out, run_dir, cache) if not p.exists()]
    try:
        prepared = _prepare_data(job, tok, cache, progress)
        probe = _answer_probe(job, tok, prepared) if job.eval_metrics else None  # rows checked before the model loads
    except BaseException:
        _remove_new(made)  # a refused run leaves OUT as it found it, so that the fixed run may start there
        raise
    model, matched, job = _load_model(job, tok, prepared, progress)
    fast = speed.resolve(job.speed, model, task=job.task, train=job.train, checkpointing=job.gradient_checkpointing)
    speed.apply(fast, model)
    train_loader, valid_loader, packed = _loaders(job, model, tok, prepared, progress, fast.pad_multiple)
    setup = Setup(job, model, tok, prepared, train_loader, valid_loader, packing=packed, answer_probe=probe)
    setup.matched, setup.speed = matched, fast
    if job.reference is not None:  # the forgetting monitor's text
        setup.reference_loader = reference_text_loader(Path(job.reference), tok, job.max_length, job.batch_size)
    return setup


def _load_model(
    job: FinetuneJob, tok: PreTrainedTokenizerBase, prepared: data.Prepared, progress: Progress
) -> tuple[PreTrainedModel, list[str], FinetuneJob]:
    """The job's model with the data's label names, LoRA added or the job's init_adapter loaded (and the base
    quantised where the job asks), what each target rule selected (a rule that selects nothing:
    target_report.LoraTargetError), and the job, its align config naming the reference adapter it loaded."""
    torch.manual_seed(job.train.seed)  # a new classification head starts the same way in every run
    with progress.task(f"loading the model {job.model}"):
        task = hf.model_task(job.task)
        model = hf.load_model(job.model, task, id2label=prepared.id2label, trust_remote_code=job.trust_remote_code)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    save = hf.head_names(model) if job.task == "seq-cls" else []
    with progress.task("adding LoRA" + (f" and quantizing the base ({job.quantize})" if job.quantize else "")):
        targets = list(job.targets) if job.targets else None  # () as None: no module rules
        if job.init_adapter is not None:  # the adapter's own targets, from its file
            finetune_align.load_start(model, job.init_adapter)
            matched = [f"{job.init_adapter}: {len(lora_layers(model))} module(s), as saved"]
        else:
            matched = describe_targets(model, targets, list(job.target_parameters))
            apply_lora(model, job.lora, targets, target_parameters=list(job.target_parameters), modules_to_save=save)
        if job.ref_adapter is not None:  # frozen beside the trained adapter; the align config names it
            assert job.align is not None  # check_align made it
            job = dataclasses.replace(job, align=finetune_align.load_reference(model, job.ref_adapter, job.align))
        if job.quantize:
            quantize_base(model, job.quantize)
    return model, matched, job


def _loaders(
    job: FinetuneJob,
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prepared: data.Prepared,
    progress: Progress,
    pad: int = 1,
) -> tuple[DataLoader[data.Encoded], DataLoader[data.Encoded], dict[str, Any] | None]:
    """The training loader (packed rows where the job packs), the validation loader, and what packing saved."""
    collate = finetune_align.collate_for(job.task, tok.pad_token_id, pad)  # pairs and prompts batch their own way
    train_rows, train_collate, packed = prepared.train, collate, None
    if job.pack:  # training rows only: validation stays unpacked, so its loss is an unpacked run's
        train_rows, packed = packing.pack_for_training(
            model, prepared.train, job.max_length, job.batch_size, job.train.seed, progress
        )
        train_collate = functools.partial(packing.collate, pad_id=tok.pad_token_id, pad_multiple=pad)
    if job.gradient_checkpointing:
        checkpointing.enable(model)
    shuffle = torch.Generator().manual_seed(job.train.seed)
    # a list is a map-style dataset to DataLoader; torch's stubs ask for a Dataset subclass
    train_loader: DataLoader[data.Encoded] = DataLoader(
        train_rows,  # type: ignore[arg-type]
        batch_size=job.batch_size,
        shuffle=True,
        generator=shuffle,
        collate_fn=train_collate,
    )
    valid_loader: DataLoader[data.Encoded] = DataLoader(
        prepared.valid,  # type: ignore[arg-type]
        batch_size=job.batch_size,
        collate_fn=collate,
    )
    return train_loader, valid_loader, packed


def _prepare_data(job: FinetuneJob, tok: PreTrainedTokenizerBase, cache: Path, progress: Progress) -> data.Prepared:
    """The job's data read and tokenized (data.prepare), reported on `progress`."""
    return data.prepare(
        job.data,
        job.task,
        tok,
        valid_path=job.valid,
        valid_fraction=job.valid_fraction,
        seed=job.train.seed,
        max_length=job.max_length,
        skip_bad_rows=job.skip_bad_rows,
        max_line_bytes=job.max_line_bytes,
        chat_template=job.chat_template,
        cache_dir=cache,
        progress=progress,
    )


def _answer_probe(job: FinetuneJob, tok: PreTrainedTokenizerBase, prepared: data.Prepared) -> answers.AnswerProbe:
    """The job's answer metrics on its first `eval_metric_rows` validation rows (those training validates on)."""
    metrics = parse_metrics(job.eval_metrics)
    rows = answers.validation_answer_rows(
        job.data,
        job.valid,
        tok,
        metrics,
        valid_fraction=job.valid_fraction,
        seed=job.train.seed,
        limit=job.eval_metric_rows,
        bad_rows=prepared.bad_rows,
        max_line_bytes=job.max_line_bytes,
    )
    return answers.AnswerProbe(tok, rows, metrics, job.eval_max_new_tokens, job.batch_size)


def _remove_new(made: list[Path]) -> None:
    """Remove the directories in `made` (outermost first) that preparing created: the cache, then empty parents."""
    for path in reversed(made):
        if path.name == DATA_CACHE:
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _trainer(setup: Setup, callbacks: list[Callback] | None) -> Trainer:
    """The job's trainer: its metric, the forgetting monitor and the answer metrics where the job asks."""
    job = setup.job
    metric = accuracy() if job.task == "seq-cls" else perplexity()
    reference = ReferenceKL(setup.reference_loader) if setup.reference_loader is not None else None
    probes = [setup.answer_probe] if setup.answer_probe is not None else []
    artifacts = Path(job.out) / RUN_DIR
    fast = setup.speed
    train = dataclasses.replace(job.train, compile=fast.compile) if fast.compile != job.train.compile else job.train
    return Trainer(
        setup.model, train, metrics=[metric], callbacks=callbacks, artifact_dir=artifacts, reference=reference,
        probes=probes, objective=speed.objective(fast, setup.model),
    )  # fmt: skip


def run(setup: Setup, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Evaluate, train, evaluate again; write the adapter to `job.out` and return the report.

    Tasks "dpo" and "grpo" train in `lorakit.align.job.run(setup)`, which scores batches with their objectives.
    """
    if setup.job.task in hf.ALIGN_TASKS:
        raise ValueError(
            f"task {setup.job.task!r} trains with lorakit.align.job.run(setup), not lorakit.hf.finetune.run"
        )
    trainer = _trainer(setup, callbacks)
    return fit_and_save(setup, trainer, setup.train_loader, setup.valid_loader)


def fit_and_save(
    setup: Setup,
    trainer: Trainer,
    train: Iterable[Any],
    valid: Iterable[Any],
    *,
    adapter: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate `valid`, fit `trainer` on `train` (resuming where the job says), evaluate again; on rank 0 write
    the adapter (`adapter`: its name, None the active one) to `job.out` with its task file and chat template,
    and the report (`extra` joins it) to `job.out/run/`. Returns the report. The job behind every finetune task.
    """
    job = setup.job
    before = trainer.evaluate(valid)
    result = trainer.fit(train, valid, resume=job.resume)
    after = trainer.evaluate(valid)
    if is_main():  # under torchrun every rank holds the same adapter; rank 0 writes it
        _save(setup, trainer, adapter)
    report = {**_report(setup, result, before, after), **(extra or {})}
    if is_main():
        write_json(Path(job.out) / RUN_DIR / REPORT, report)
    return report


def _save(setup: Setup, trainer: Trainer, adapter: str | None) -> None:
    """The adapter in PEFT format, the task file (the model task the adapter serves) and the chat template."""
    job, out = setup.job, Path(setup.job.out)
    save_adapters(setup.model, out, name=adapter, fingerprints=trainer.fingerprints)
    hf.write_task_file(
        out,
        hf.model_task(job.task),
        base_model=Path(job.model).resolve(),
        id2label=setup.prepared.id2label,
        max_length=job.max_length,
    )
    if setup.prepared.chat_template is not None:  # so that prediction renders prompts as training did
        chat.save_template(out, setup.prepared.chat_template)


def _report(setup: Setup, result: TrainResult, before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the run was and did, as finetune_report.json records it."""
    job, out = setup.job, Path(setup.job.out)
    trainable, total = trainable_parameters(setup.model)
    return {
        "task": job.task,
        "model": str(job.model),
        "data": str(job.data),
        "valid": str(job.valid) if job.valid else None,
        "adapter": str(out),
        "artifacts": str(out / RUN_DIR),
        "train_rows": len(setup.prepared.train),
        "valid_rows": len(setup.prepared.valid),
        "skipped_bad_rows": [str(b) for b in setup.prepared.bad_rows],
        "id2label": setup.prepared.id2label,
        "lora": job.lora.to_dict(),
        "targets": list(job.targets) if job.targets is not None else None,
        "target_parameters": list(job.target_parameters),
        "matched": setup.matched,
        "train": job.train.to_dict(),
        "quantize": job.quantize,
        "reference": str(job.reference) if job.reference is not None else None,
        "batch_size": job.batch_size,
        "max_length": job.max_length,
        "trainable_params": trainable,
        "total_params": total,
        "steps": result.steps,
        "elapsed_s": result.elapsed_s,
        "before": before,
        "after": after,
        "gradient_checkpointing": job.gradient_checkpointing,
        "packing": setup.packing,  # None unless job.pack: rows and padding fractions before and after
        "speed": setup.speed.to_dict(),  # what job.speed resolved to: loss, fuse, compile, pad multiple
    }
