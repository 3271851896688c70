"""Whether a loaded model can be fine-tuned for a task, judged from what transformers initialised afresh.

transformers loads a BERT checkpoint as `AutoModelForCausalLM` without complaint: `BertLMHeadModel`, its
LM head (`cls.predictions...`) drawn at random and its attention still bidirectional, with the warnings
that say so hidden by the CLI. Training that "causal LM" runs and learns nothing useful. So a load is
refused when

- any weight a causal LM needs is missing from the checkpoint (`output_loading_info`'s missing keys are
  tensors that start from random values), or
- the model type is an encoder (its masked-LM class is its pre-training head) not configured as a decoder:
  it sees the tokens after the one it predicts, even where its LM head loads.

For seq-cls the classification head is new by design (it trains in full beside LoRA); any other missing
weight is refused the same way. A task file's labels (`check_id2label`) must name the head's classes 0..n-1.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import LoraFileError

HEAD_PREFIXES = ("classifier.", "score.")  # the new head of a seq-cls model (models.HEAD_NAMES)


class TaskMismatchError(LoraFileError):
    """A model that cannot be fine-tuned for the task asked (hf/task_fit.py); `can` is a task it can do, if any."""

    def __init__(self, path: Path, model_type: str, task: str, can: str | None, detail: str) -> None:
        self.model_type, self.task, self.can = model_type, task, can
        self.detail = f"{path}: {detail}"
        super().__init__(
            self.detail + (f"; fine-tune it as task={can!r}" if can else ""), param="task" if can else None
        )


def check_task_fit(path: Path, model: Any, task: str, missing_keys: Iterable[str]) -> None:
    """TaskMismatchError if `model` (loaded from `path` for `task`) would train from randomly initialised parts."""
    model_type = str(getattr(model.config, "model_type", "") or type(model).__name__)
    missing = sorted(missing_keys)
    if task == "seq-cls":
        missing = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
    if task == "causal-lm" and _is_encoder(model):
        raise TaskMismatchError(
            path,
            model_type,
            task,
            "seq-cls",
            f"{model_type} is an encoder (bidirectional attention); it cannot be fine-tuned as a causal-lm"
            + (f" (its causal-LM head would start from random weights: {_listed(missing)})" if missing else ""),
        )
    if missing:
        can = "seq-cls" if task == "causal-lm" and _has_sequence_classifier(model_type) else None
        raise TaskMismatchError(
            path,
            model_type,
            task,
            can,
            f"{model_type} cannot be fine-tuned as a {task}: the checkpoint lacks weights the {task} model needs, "
            f"so they would start from random values: {_listed(missing)}",
        )


def check_config_fit(path: Path, config: Any, task: str) -> None:
    """TaskMismatchError if the model's config alone shows it cannot be fine-tuned for `task` (an encoder as a
    causal-lm): checked before any data is read, so that a model/task mismatch is not reported as a data problem."""
    if task == "causal-lm" and _is_encoder_config(config):
        model_type = str(getattr(config, "model_type", "") or type(config).__name__)
        raise TaskMismatchError(
            path,
            model_type,
            task,
            "seq-cls",
            f"{model_type} is an encoder (bidirectional attention); it cannot be fine-tuned as a causal-lm",
        )


def _is_encoder(model: Any) -> bool:
    """An encoder-only model type (it has a masked-LM class) that its config does not make a decoder."""
    return _is_encoder_config(model.config)


def _is_encoder_config(config: Any) -> bool:
    """`_is_encoder`, from a model config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        return False
    return getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _has_sequence_classifier(model_type: str) -> bool:
    """Whether transformers has a sequence-classification class for `model_type`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    return model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES


def _listed(keys: list[str], k: int = 4) -> str:
    """The first `k` keys, and how many there are in all."""
    shown = ", ".join(keys[:k])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > k else "")


def check_id2label(where: Path, labels: Any) -> dict[int, str] | None:
    """A task file's id2label: None, or an object mapping "0".."n-1" to label names; LoraFileError otherwise."""
    if not labels:
        return None
    if not isinstance(labels, dict):
        raise LoraFileError(f'{where}: id2label must be an object {{"0": name, ...}}; got a {type(labels).__name__}')
    ids = sorted(int(k) for k in labels if isinstance(k, str) and k.strip().lstrip("-").isdigit())
    if ids != list(range(len(labels))):
        raise LoraFileError(
            f"{where}: id2label's keys must be the class ids 0..{len(labels) - 1}; got {sorted(labels)[:10]}"
        )
    bad = [k for k, v in labels.items() if not isinstance(v, (str, int))]
    if bad:
        raise LoraFileError(f"{where}: id2label[{bad[0]!r}] must be a label name; got {type(labels[bad[0]]).__name__}")
    return {int(k): str(v) for k, v in labels.items()}
