"""The merged model's forward logits as an ONNX graph, written with torch's exporter and proven in onnxruntime.

    load base + adapter(s) → reference logits (adapters unmerged) → merge → torch.onnx.export → onnxruntime → proof

The output is a directory: `model.onnx` (dynamic batch and sequence axes; inputs `input_ids`, `attention_mask`
and, where the tokenizer makes them, `token_type_ids`; output `logits`), the tokenizer and `config.json` (labels)
to prepare inputs and read outputs, and `proof.json` (proof.py). It is written beside `out` and renamed into
place only when the proof passes, so a failed export leaves nothing at `out`.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..files.atomic import replacing_dir
from ..train.progress import Progress, quiet
from .prepare import PROOF_TEXTS, Exported, ProofFailed, load_unmerged
from .proof import check_onnx

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ONNX_FILE = "model.onnx"
DTYPES = ("f32",)  # the exported weights' types (proof.TOLERANCE has a bound for each)
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


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


def proof_inputs(tok: PreTrainedTokenizerBase, texts: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
    """The tokenised proof texts as one padded batch, with the inputs the exported graph takes."""
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
    dtype: str = "f32",
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
    return Exported(out, out / ONNX_FILE, task, (proof,))


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
