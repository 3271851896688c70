"""What every export starts from: the base with its adapter(s) loaded unmerged, checked for what export cannot take.

The unmerged model is the reference: each format's proof compares the artefact's logits with this model's on the
same inputs, so a mistake in merging is caught too, not only one in writing the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LoraError
from ..hf import models as hf
from ..train.progress import Progress, quiet
from .proof import Proof

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Held-out proof inputs of different lengths, so padding and the attention mask are exercised too.
PROOF_TEXTS = (
    "The film was a delight from start to finish.",
    "I would not recommend this product to anyone.",
    "Edge devices run small models.",
    "ok",
)


class ExportInputError(LoraError, ValueError):
    """The model or adapter cannot be exported as asked (a quantised base, an unsupported task, ...)."""


class ProofFailed(LoraError, RuntimeError):
    """The exported artefact does not compute what lorakit does, within the stated tolerance."""

    def __init__(self, proof: Proof) -> None:
        super().__init__(f"the proof failed: {proof.summary()}")
        self.proof = proof


@dataclass(frozen=True)
class Exported:
    """What an export wrote: the output directory, the artefact in it, the task and the proof(s)."""

    out: Path
    artefact: Path
    task: str
    proofs: tuple[Proof, ...]

    @property
    def proof(self) -> Proof:
        """The proof of the artefact itself (the last one: a GGUF adapter's base is proven first)."""
        return self.proofs[-1]


def check_exportable(model_dir: str | Path) -> Path:
    """The model directory, checked for what export cannot take (a quantised base)."""
    path = hf.check_model_dir(model_dir)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ExportInputError(
            f"{config_file}: the base is quantised ({method}); export needs full-precision weights: "
            "export from the unquantised base model"
        )
    return path


def load_unmerged(
    model_dir: str | Path,
    adapter_dirs: list[Path],
    *,
    allow_base_mismatch: bool = False,
    progress: Progress | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """(model, tokenizer, task): the base with its adapter(s) loaded, unmerged; several are combined exactly ("cat").

    Each adapter is checked against the base it was saved for (its lorakit.json) unless `allow_base_mismatch`.
    """
    from .. import adapters
    from ..loading import load_adapters

    progress = progress or quiet()
    check_exportable(model_dir)
    if len(adapter_dirs) == 1:
        model, tok, task = hf.load_with_adapter(
            model_dir, adapter_dirs[0], allow_base_mismatch=allow_base_mismatch, progress=progress
        )
    else:
        tasks = {hf.read_task(d)[0] for d in adapter_dirs}
        if len(tasks) != 1 or "seq-cls" in tasks:
            raise ExportInputError(
                f"several adapters combine only for one causal-lm task; these are {sorted(tasks)}: export one at a time"
            )
        task = tasks.pop()
        with progress.task(f"loading the model {model_dir}"):
            model, tok = hf.load(model_dir, task)
        names = [f"adapter{i}" for i in range(len(adapter_dirs))]
        for name, d in zip(names, adapter_dirs, strict=True):
            with progress.task(f"loading the adapter {d}"):
                load_adapters(model, d, name=name, allow_base_mismatch=allow_base_mismatch)
        adapters.combine_adapters(model, dict.fromkeys(names, 1.0), "combined")
        adapters.set_adapter(model, "combined")
        for name in names:
            adapters.delete_adapter(model, name)
    if task not in ("seq-cls", "causal-lm"):
        raise ExportInputError(f"task {task!r}: export covers seq-cls and causal-lm")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok, task
