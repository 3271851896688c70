"""The merged model's forward logits as an ONNX graph, written with torch's exporter and proven in onnxruntime.

    load base + adapter(s) → reference logits (adapters unmerged) → merge → torch.onnx.export → onnxruntime → proof

The output is a directory: `model.onnx` (dynamic batch and sequence axes; inputs `input_ids`, `attention_mask`
and, where the tokenizer makes them, `token_type_ids`; output `logits`), the tokenizer and `config.json` (labels)
to prepare inputs and read outputs, and `proof.json` (proof.py). It is written beside `out` and renamed into
place only when the proof passes, so a failed export leaves nothing at `out`.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import LoraError
from ..files.atomic import replacing_dir
from ..hf import models as hf
from ..train.progress import Progress, quiet
from .proof import Proof, check_onnx

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ONNX_FILE = "model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
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
    """What `export_onnx` wrote: the directory, the ONNX file in it, the task and the proof."""

    out: Path
    onnx_file: Path
    task: str
    proof: Proof


class _Logits(nn.Module):
    """The model's forward pass as a function of named tensors returning only the logits (no cache, no dict)."""

    def __init__(self, model: PreTrainedModel, names: tuple[str, ...], task: str) -> None:
        super().__init__()
        self.model, self.names, self.causal = model, names, task == "causal-lm"

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, C) for seq-cls, (B, T, V) for causal-lm."""
        kwargs: dict[str, Any] = dict(zip(self.names, (input_ids, attention_mask, token_type_ids), strict=False))
        if self.causal:
            kwargs["use_cache"] = False  # the logits only: no key/value cache in the graph
        return self.model(**kwargs).logits


def check_exportable(model_dir: str | Path) -> Path:
    """The model directory, checked for what ONNX export cannot take (a quantised base)."""
    path = hf.check_model_dir(model_dir)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ExportInputError(
            f"{config_file}: the base is quantised ({method}); ONNX export needs full-precision weights: "
            "export from the unquantised base model"
        )
    return path


def load_unmerged(
    model_dir: str | Path, adapter_dirs: list[Path], *, progress: Progress | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """(model, tokenizer, task): the base with its adapter(s) loaded, unmerged; several are combined exactly ("cat")."""
    from .. import adapters
    from ..loading import load_adapters

    progress = progress or quiet()
    check_exportable(model_dir)
    if len(adapter_dirs) == 1:
        model, tok, task = hf.load_with_adapter(model_dir, adapter_dirs[0], progress=progress)
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
                load_adapters(model, d, name=name)
        adapters.combine_adapters(model, dict.fromkeys(names, 1.0), "combined")
        adapters.set_adapter(model, "combined")
        for name in names:
            adapters.delete_adapter(model, name)
    if task not in ("seq-cls", "causal-lm"):
        raise ExportInputError(f"task {task!r}: ONNX export covers seq-cls and causal-lm")
    return model.eval(), tok, task


def proof_inputs(tok: PreTrainedTokenizerBase, texts: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
    """The tokenised proof texts as one padded batch, with the inputs the exported graph takes."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(list(texts), return_tensors="pt", padding=True)
    return {k: batch[k] for k in INPUT_NAMES if k in batch}


def export_onnx(
    model_dir: str | Path,
    adapter_dirs: list[Path],
    out: str | Path,
    *,
    texts: tuple[str, ...] | list[str] = PROOF_TEXTS,
    tolerance: float | None = None,
    progress: Progress | None = None,
) -> Exported:
    """Load the base with its adapter(s) (`load_unmerged`) and export it to `out` (`export_loaded`)."""
    require_runtime()
    model, tok, task = load_unmerged(model_dir, adapter_dirs, progress=progress)
    return export_loaded(model, tok, task, out, texts=texts, tolerance=tolerance, progress=progress)


def export_loaded(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    task: str,
    out: str | Path,
    *,
    texts: tuple[str, ...] | list[str] = PROOF_TEXTS,
    tolerance: float | None = None,
    progress: Progress | None = None,
) -> Exported:
    """Merge the model's adapters, export its logits to ONNX in `out` (a new directory), prove it in onnxruntime.

    Raises ProofFailed (and writes nothing at `out`) when onnxruntime's logits differ from the unmerged model's by
    more than the tolerance (proof.TOLERANCE for f32) or an argmax disagrees. The model is merged in place.
    """
    from ..model import merge

    progress = progress or quiet()
    require_runtime()
    out = Path(out)
    inputs = proof_inputs(tok, texts)
    with progress.task("computing lorakit's logits (adapters unmerged)"), torch.no_grad():
        reference = _Logits(model, tuple(inputs), task)(*inputs.values()).float()
    with progress.task("merging the adapters into the base"):
        merge(model)
    with replacing_dir(out) as new:
        onnx_file = new / ONNX_FILE
        with progress.task(f"exporting {out / ONNX_FILE} with torch.onnx"):
            _export(_Logits(model, tuple(inputs), task).eval(), inputs, onnx_file)
        with progress.task("checking the ONNX model in onnxruntime (CPU)"):
            proof = check_onnx(onnx_file, inputs, reference, task=task, tolerance=tolerance)
        proof.write(new / "proof.json")
        if not proof.passed:
            raise ProofFailed(proof)
        tok.save_pretrained(new)
        model.config.save_pretrained(new)
    return Exported(out, out / ONNX_FILE, task, proof)


def require_runtime() -> None:
    """ImportError naming the extra to install, unless onnx, onnxscript (torch's exporter) and onnxruntime import."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install 'lorakit[export]'")


def _export(module: nn.Module, inputs: dict[str, torch.Tensor], onnx_file: Path) -> None:
    """torch.onnx.export (the dynamo exporter) with dynamic batch and sequence axes, its chatter silenced."""
    dynamic = {name: {0: "batch", 1: "sequence"} for name in inputs}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(inputs.values()),
            str(onnx_file),
            input_names=list(inputs),
            output_names=["logits"],
            dynamic_shapes=tuple(dynamic.values()),
            dynamo=True,
            verbose=False,
            external_data=True,  # models over 2 GB keep their weights beside the graph
        )
