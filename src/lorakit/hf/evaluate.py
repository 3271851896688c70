"""Metrics of a base model and of adapters on it, over a data file: the library behind `lorakit eval`.

    report = evaluate("models/tiny-llama", {"math": "adapters/math"}, "valid.jsonl")
    report["base"]["loss"], report["adapters"]["math"]["perplexity"]

causal-lm: the mean cross-entropy over every labelled token of the file (token-weighted: a long row counts
for its tokens, not as one sample; prompt tokens of prompt/completion rows carry no label) and its exp, the
perplexity, and with `metrics` each answer metric's mean over the rows' greedy answers (answers.py).
seq-cls: accuracy, macro-F1 (the mean per-label F1 over the labels that occur in the data or the predictions,
as scikit-learn's `f1_score(average="macro")`) and the confusion matrix (rows: true label, columns: predicted),
labelled with the adapter's own label names.

Data rows go through fine-tuning's pipeline (`data.encode_file`: `rows`, `examples`, `encoding`), so a bad
row is `file:line: reason`.
Causal-lm adapters share one base (loaded by name, switched with `use_adapter`; the base runs with
`disable_adapters`). A seq-cls adapter brings its own classification head (modules_to_save), which cannot
share a base with another's, so each gets a base of its own; the base itself is not scored for seq-cls, since
its head is untrained (random): `report["base"]` is None and `report["note"]` says why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import LoraFileError
from ..ui import progress as progress_mod
from . import answers, data, templates
from . import models as hf
from .answer_metrics import AnswerMetric, parse_metrics
from .batches import batches
from .prepared import IGNORE_INDEX, Encoded
from .rows import MAX_LINE_BYTES, BadRow

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..ui.progress import Progress

DEFAULT_MAX_LENGTH = 256  # where neither the caller nor the adapter's task file says
BASE_SEQ_CLS_NOTE = (
    "seq-cls: the base model has no trained classification head (it would be random), so it is not scored"
)


class TaskMismatchError(LoraFileError):
    """Adapters (or an adapter and the task asked for) that are for different tasks or label sets."""


def adapter_tasks(adapters: Mapping[str, str | Path], task: str | None = None) -> tuple[str, dict[int, str] | None]:
    """(task, id2label) shared by every adapter (their lorakit_task.json); TaskMismatchError naming them if not.

    With no adapters the task is `task` (default causal-lm); seq-cls then has no labels to score and is refused.
    """
    found = {name: hf.read_task(d) for name, d in adapters.items()}
    kinds = {t for t, _ in found.values()}
    if len(kinds) > 1:
        which = ", ".join(f"{n}={adapters[n]} ({t})" for n, (t, _) in found.items())
        raise TaskMismatchError(f"the adapters are for different tasks: {which}; evaluate each task on its own")
    if not found:
        if task == "seq-cls":
            raise ValueError("seq-cls needs an adapter: the label names and the trained head come from it")
        return task or "causal-lm", None
    adapter_task = kinds.pop()
    if task is not None and task != adapter_task:
        raise TaskMismatchError(f"task={task!r} was asked for, but the adapters are {adapter_task} adapters")
    labels = {name: id2label for name, (_, id2label) in found.items()}
    if len({json.dumps(v, sort_keys=True) for v in labels.values()}) > 1:
        which = "; ".join(f"{n}: {list(v.values()) if v else None}" for n, v in labels.items())
        raise TaskMismatchError(f"the seq-cls adapters have different labels ({which}); evaluate them one at a time")
    return adapter_task, next(iter(labels.values()))


def trained_max_length(adapter_dir: str | Path) -> int | None:
    """The max_length an adapter was fine-tuned with (its lorakit_task.json), if it says."""
    path = Path(adapter_dir) / hf.TASK_FILE
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("max_length")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 2 else None


def _outputs(
    model: nn.Module, rows: Sequence[Encoded], pad_id: int, batch_size: int, progress: Progress | None, what: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(fp32 logits, labels) of each padded batch of `rows`, in eval mode, without gradients, on the model's device."""
    progress = progress or progress_mod.quiet()
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad(), progress.task(what, total=math.ceil(len(rows) / batch_size), unit="batches") as t:
        for batch in batches(rows, batch_size, pad_id):
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            yield model(input_ids=ids, attention_mask=mask).logits.float(), batch["labels"].to(device)
            t.advance()


def causal_lm_metrics(
    model: nn.Module,
    rows: Sequence[Encoded],
    pad_id: int,
    *,
    batch_size: int = 8,
    progress: Progress | None = None,
    description: str = "evaluating",
) -> dict[str, Any]:
    """{"rows", "tokens", "loss", "perplexity"}: mean next-token cross-entropy over every labelled token."""
    total, tokens = 0.0, 0
    for logits, labels in _outputs(model, rows, pad_id, batch_size, progress, description):  # (B, T, V), (B, T)
        target = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
        loss = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += float(loss)
        tokens += int((target != IGNORE_INDEX).sum())
    mean = total / tokens
    return {"rows": len(rows), "tokens": tokens, "loss": mean, "perplexity": math.exp(min(mean, 700.0))}


def seq_cls_metrics(
    model: nn.Module,
    rows: Sequence[Encoded],
    pad_id: int,
    id2label: Mapping[int, str],
    *,
    batch_size: int = 8,
    progress: Progress | None = None,
    description: str = "evaluating",
) -> dict[str, Any]:
    """{"rows", "loss", "accuracy", "macro_f1", "labels", "confusion", "per_label"} of a classifier."""
    k = len(id2label)
    confusion = torch.zeros((k, k), dtype=torch.long)  # (true, predicted)
    total = 0.0
    for logits, y in _outputs(model, rows, pad_id, batch_size, progress, description):  # (B, C), (B,)
        total += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        confusion += torch.bincount((y * k + logits.argmax(dim=-1)).cpu(), minlength=k * k).view(k, k)
    return {"rows": len(rows), "loss": total / len(rows), **classification_scores(confusion.tolist(), id2label)}


def classification_scores(confusion: Sequence[Sequence[int]], id2label: Mapping[int, str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-label precision/recall/F1/support from a confusion matrix (rows: true).

    Examples:
        >>> s = classification_scores([[3, 1], [0, 4]], {0: "neg", 1: "pos"})
        >>> s["accuracy"], round(s["macro_f1"], 4), s["per_label"]["pos"]["precision"]
        (0.875, 0.873, 0.8)
    """
    k = len(confusion)
    names = [id2label[i] for i in range(k)]
    n = sum(map(sum, confusion))
    per_label: dict[str, dict[str, float | int]] = {}
    f1s = []
    for i, name in enumerate(names):
        tp = confusion[i][i]
        support, predicted = sum(confusion[i]), sum(row[i] for row in confusion)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support or predicted:  # a label absent from both data and predictions does not count
            f1s.append(f1)
    return {
        "accuracy": sum(confusion[i][i] for i in range(k)) / n if n else 0.0,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "labels": names,
        "confusion": [list(row) for row in confusion],
        "per_label": per_label,
    }


def _load_base(
    model_dir: str | Path, task: str, id2label: Mapping[int, str] | None, pad_id: int, trust_remote_code: bool
) -> PreTrainedModel:
    """The base model for `task`; its pad id follows the tokenizer's."""
    model = hf.load_model(model_dir, task, id2label=id2label, trust_remote_code=trust_remote_code)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    return model


@dataclass
class EvalSetup:
    """An evaluation made concrete: the tokenized rows and the model(s), every input checked."""

    model_dir: Path
    task: str
    id2label: dict[int, str] | None
    adapters: dict[str, Path]
    tokenizer: PreTrainedTokenizerBase
    rows: list[Encoded]
    bad_rows: list[BadRow]
    model: PreTrainedModel  # causal-lm: every adapter loaded by name; seq-cls: the bare base (adapters planned)
    data_path: str
    max_length: int
    batch_size: int
    device: str
    trust_remote_code: bool
    allow_base_mismatch: bool = False  # adapters load even onto a base other than their lorakit.json records
    metrics: Sequence[AnswerMetric] = ()  # causal-lm: answer metrics, scored on `answer_rows` (answers.py)
    answer_rows: Sequence[answers.AnswerRow] = ()
    max_new_tokens: int = answers.MAX_NEW_TOKENS


def prepare(
    model_dir: str | Path,
    adapters: Mapping[str, str | Path],
    data_path: str | Path,
    *,
    task: str | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    skip_bad_rows: bool = False,
    max_line_bytes: int = MAX_LINE_BYTES,
    device: str | None = None,
    trust_remote_code: bool = False,
    allow_base_mismatch: bool = False,
    chat_template: str | Path | None = None,
    metrics: Sequence[str] = (),
    max_new_tokens: int = answers.MAX_NEW_TOKENS,
    progress: Progress | None = None,
) -> EvalSetup:
    """Resolve the task, read and tokenize the data, load the base and the adapters: every input error is here.

    `max_length` defaults to the one the adapters were trained with (their task files), else 256. Chat rows are
    rendered with `chat_template` (a Jinja file), else the template the adapters trained with (saved beside
    them), else the tokenizer's own: so an adapter is scored on the format it learned. seq-cls adapters are
    checked against the base here (keys, shapes) and attached one at a time by `run`. `metrics` (answer_metrics
    specs, causal-lm) score each row's greedy answer of at most `max_new_tokens` tokens against its reference.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected an int >= 1")
    progress = progress or progress_mod.quiet()
    task, id2label = adapter_tasks(adapters, task)
    answers.check_task(answer_metrics := parse_metrics(metrics), task)
    hf.check_task(model_dir, task, trust_remote_code=trust_remote_code)  # the model and task before the data
    template = templates.adapters_template(adapters, chat_template)
    max_length = _adapters_max_length(adapters) if max_length is None else max_length
    tok = _tokenizer(model_dir, template, trust_remote_code, progress)
    options: dict[str, Any] = {"max_length": max_length, "skip_bad_rows": skip_bad_rows, "progress": progress}
    rows, bad = data.encode_file(data_path, task, tok, id2label=id2label, max_line_bytes=max_line_bytes, **options)
    rows_to_answer = answers.file_answer_rows(
        data_path, task, tok, answer_metrics, bad_rows=bad, max_line_bytes=max_line_bytes
    ) if answer_metrics else []  # fmt: skip
    model = _load_models(model_dir, adapters, task, id2label, tok, trust_remote_code, allow_base_mismatch, progress)
    return EvalSetup(
        Path(model_dir),
        task,
        id2label,
        {n: Path(d) for n, d in adapters.items()},
        tok,
        rows,
        bad,
        model,
        str(data_path),
        max_length,
        batch_size,
        device or "cpu",
        trust_remote_code,
        allow_base_mismatch,
        answer_metrics,
        rows_to_answer,
        max_new_tokens,
    )


def _tokenizer(
    model_dir: str | Path, template: str | None, trust_remote_code: bool, progress: Progress
) -> PreTrainedTokenizerBase:
    """The base's tokenizer, rendering chat rows with `template` where there is one (else its own)."""
    with progress.task("loading tokenizer"):
        tok = hf.load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    if template is not None:
        tok.chat_template = template
    return tok


def _adapters_max_length(adapters: Mapping[str, str | Path]) -> int:
    """The longest max_length the adapters were fine-tuned with, else DEFAULT_MAX_LENGTH."""
    trained = {m for d in adapters.values() if (m := trained_max_length(d)) is not None}
    return max(trained) if trained else DEFAULT_MAX_LENGTH


def _load_models(
    model_dir: str | Path,
    adapters: Mapping[str, str | Path],
    task: str,
    id2label: dict[int, str] | None,
    tok: PreTrainedTokenizerBase,
    trust_remote_code: bool,
    allow_base_mismatch: bool,
    progress: Progress,
) -> PreTrainedModel:
    """The base with the causal-lm adapters loaded, or (seq-cls) with each adapter checked against it for `run`."""
    from ..fingerprint import Fingerprints, check_base
    from ..loading import load_adapters, plan_load, read_adapter

    with progress.task("loading model", total=len(adapters) + 1, unit="parts") as t:
        model = _load_base(model_dir, task, id2label, tok.pad_token_id, trust_remote_code)
        t.advance()
        fp = Fingerprints()  # one base: hashed once for all the adapters
        for name, d in adapters.items():
            if task == "seq-cls":  # each brings its own head: checked against the bare base, attached in run
                plan_load(model, file := read_adapter(d))
                check_base(model, file, allow_mismatch=allow_base_mismatch, fingerprints=fp)
            else:
                load_adapters(model, d, name=name, allow_base_mismatch=allow_base_mismatch, fingerprints=fp)
            t.advance()
    return model


def run(setup: EvalSetup, progress: Progress | None = None) -> dict[str, Any]:
    """Score the base and each adapter of a prepared evaluation (see the module docstring).

    Returns {"task", "data", "rows", "max_length", "skipped_bad_rows", "base": {...} | None,
    "adapters": {name: {...}}}, plus "note" when the base is not scored (seq-cls).
    """
    from .. import adapters as named
    from ..loading import load_adapters

    progress = progress or progress_mod.quiet()
    s = setup
    report: dict[str, Any] = {
        "task": s.task,
        "data": s.data_path,
        "rows": len(s.rows),
        "max_length": s.max_length,
        "skipped_bad_rows": [str(b) for b in s.bad_rows],
    }
    pad_id = s.tokenizer.pad_token_id
    scored: dict[str, dict[str, Any]] = {}
    common: dict[str, Any] = {"batch_size": s.batch_size, "progress": progress}
    if s.task == "seq-cls":
        assert s.id2label is not None  # adapter_tasks refuses seq-cls without adapters
        report.update(base=None, note=BASE_SEQ_CLS_NOTE)
        for i, (name, d) in enumerate(s.adapters.items()):
            if i == 0:
                model = s.model  # the prepared base takes the first adapter; the others get a fresh one each
            else:
                with progress.task(f"loading model for adapter {name}"):
                    model = _load_base(s.model_dir, s.task, s.id2label, pad_id, s.trust_remote_code)
            load_adapters(model, d, allow_base_mismatch=s.allow_base_mismatch)
            model.to(s.device)  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides the bound self
            scored[name] = seq_cls_metrics(
                model, s.rows, pad_id, s.id2label, **common, description=f"evaluating {name}"
            )
        report["adapters"] = scored
        return report
    s.model.to(s.device)  # type: ignore[arg-type]
    with named.disable_adapters(s.model):
        report["base"] = causal_lm_metrics(s.model, s.rows, pad_id, **common, description="evaluating base")
        report["base"].update(_answer_means(s, progress))
    for name in s.adapters:
        with named.use_adapter(s.model, name):
            scored[name] = causal_lm_metrics(s.model, s.rows, pad_id, **common, description=f"evaluating {name}")
            scored[name].update(_answer_means(s, progress))
    report["adapters"] = scored
    if s.metrics:
        report.update(metrics=[m.name for m in s.metrics], max_new_tokens=s.max_new_tokens)
    return report


def _answer_means(s: EvalSetup, progress: Progress) -> dict[str, float]:
    """Each answer metric's mean over the setup's rows, for the model as it is (no metrics: nothing)."""
    if not s.metrics:
        return {}
    options: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "batch_size": s.batch_size, "progress": progress}
    return answers.generate_and_score(s.model, s.tokenizer, s.answer_rows, s.metrics, **options).means


def evaluate(
    model_dir: str | Path,
    adapters: Mapping[str, str | Path],
    data_path: str | Path,
    *,
    progress: Progress | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`run(prepare(...))`: metrics of the base and of each named adapter on one data file.

    `options` are `prepare`'s (task, batch_size, max_length, skip_bad_rows, max_line_bytes, device,
    trust_remote_code, allow_base_mismatch, chat_template, metrics, max_new_tokens).
    """
    return run(prepare(model_dir, adapters, data_path, progress=progress, **options), progress)
