"""The parts of a finetune job that the stages after SFT add (tasks "dpo" and "grpo"): their config, the adapter
the training starts from, the frozen reference adapter, and how their rows are batched.

    FinetuneJob(..., task="dpo", init_adapter="sft/", ref_adapter="sft/")   # DPO from an SFT adapter

`init_adapter` is loaded as the trained adapter ("default", trainable) in place of a fresh LoRA, so the LoRA
settings come from its file and the job's own are refused; `ref_adapter` is loaded beside it under the name
"reference", frozen, and the align config's `reference` names it. The training itself is `lorakit.align.job`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapters import active_adapter, set_adapter
from ..config import LoraConfig
from ..loading import load_adapters
from ..train import DPOConfig, GRPOConfig
from .batches import collate
from .models import ALIGN_TASKS
from .preference_batches import collate_pairs, collate_prompts

if TYPE_CHECKING:
    from torch import nn

REFERENCE = "reference"  # the name the frozen reference adapter is loaded under
DEFAULT_LORA = LoraConfig(rank=8, alpha=16.0)  # FinetuneJob's default: a job that left the LoRA settings alone
CONFIGS: dict[str, type[DPOConfig] | type[GRPOConfig]] = {"dpo": DPOConfig, "grpo": GRPOConfig}
AlignConfig = DPOConfig | GRPOConfig


def check_align(task: str, align: AlignConfig | None, ref_adapter: Path | str | None) -> AlignConfig | None:
    """The job's align config (the task's default when None); ValueError naming the field that does not fit."""
    if task not in ALIGN_TASKS:
        if align is not None:
            raise ValueError(f"align={type(align).__name__}(...) is for tasks {', '.join(ALIGN_TASKS)}; got {task!r}")
        return None
    wanted = CONFIGS[task]
    if align is None:
        align = wanted()
    if not isinstance(align, wanted):
        raise ValueError(
            f"align={type(align).__name__}(...) does not fit task {task!r}: expected a {wanted.__name__} "
            f"(lorakit.train.{wanted.__name__})"
        )
    if align.reference not in (None, REFERENCE) or (align.reference == REFERENCE and ref_adapter is None):
        raise ValueError(
            f"align.reference={align.reference!r}: the reference adapter is the one the job loads (ref_adapter=DIR, "
            f"named {REFERENCE!r}); leave align.reference None"
        )
    if ref_adapter is not None and isinstance(align, DPOConfig) and align.loss_type == "simpo":
        raise ValueError(f"ref_adapter={str(ref_adapter)!r} is not used by loss_type='simpo' (reference-free)")
    return align


def check_adapter_options(job: Any) -> None:
    """ValueError naming the field when init_adapter/ref_adapter meet a task or a LoRA setting they exclude."""
    for name in ("init_adapter", "ref_adapter"):
        if getattr(job, name) is not None and job.task not in ALIGN_TASKS:
            raise ValueError(
                f"{name}={str(getattr(job, name))!r} is for tasks {', '.join(ALIGN_TASKS)}; got {job.task!r}"
            )
    if job.init_adapter is None:
        return
    mine, default = job.lora.to_dict(), DEFAULT_LORA.to_dict()
    changed = [f"lora.{k}={mine[k]!r}" for k in mine if mine[k] != default[k]]
    changed += [f"{k}={list(getattr(job, k))!r}" for k in ("targets", "target_parameters") if getattr(job, k)]
    if changed:
        raise ValueError(
            f"{changed[0]} conflicts with init_adapter={str(job.init_adapter)!r}: the trained adapter starts as that "
            "adapter, with its rank, alpha and targets; drop the LoRA settings, or drop init_adapter"
        )


def load_start(model: nn.Module, init_adapter: Path | str) -> None:
    """Load `init_adapter` as the model's trained adapter: active, its factors trainable, the base frozen."""
    load_adapters(model, init_adapter)  # on a model without LoRA: the file's config applied, its tensors loaded
    set_adapter(model, active_adapter(model))  # the active adapter's factors trainable, whatever loading left


def load_reference(model: nn.Module, ref_adapter: Path | str, align: AlignConfig) -> AlignConfig:
    """Load `ref_adapter` frozen beside the trained adapter, named "reference"; the align config that uses it."""
    load_adapters(model, ref_adapter, name=REFERENCE)  # a new inactive adapter: the trained one stays active
    return dataclasses.replace(align, reference=REFERENCE)


def collate_for(task: str, pad_id: int, pad_multiple: int = 1) -> Callable[[Any], Any]:
    """The collate function of `task`'s rows: pairs (dpo), prompts (grpo), else the model tasks' padding (to a
    multiple of `pad_multiple`)."""
    if task in ("dpo", "grpo"):
        return functools.partial({"dpo": collate_pairs, "grpo": collate_prompts}[task], pad_id=pad_id)
    return functools.partial(collate, pad_id=pad_id, pad_multiple=pad_multiple)
