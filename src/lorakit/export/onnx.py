"""The merged model's forward logits as an ONNX graph, written with torch's exporter and proven in onnxruntime.

    load base + adapter(s) → reference logits (adapters unmerged) → merge → torch.onnx.export → onnxruntime → proof

The output is a directory: `model.onnx` (dynamic batch and sequence axes; inputs `input_ids`, `attention_mask`
and, where the tokenizer makes them, `token_type_ids`; output `logits`), the tokenizer and `config.json` (labels)
to prepare inputs and read outputs, and `proof.json` (proof.py). It is written beside `out` and renamed into
place only when the proof passes, so a failed export leaves nothing at `out`.

The graph is exported in f32, then lowered with onnxruntime's own tools: f16 by its float16 converter (inputs
and the logits stay as they were), q8_0 by its weight-only int8 quantiser (MatMulNBits: 8 bits, blocks of 32,
one scale each, symmetric: GGUF q8_0's scheme, not its bytes; the embedding table stays f32). onnxruntime's
dynamic int8 quantisation (`quantize_dynamic`) was measured and not used: it quantises the activations too, and
changed 4 of 9 of the MiniLM test classifier's predictions. bf16 is refused (`REFUSED`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..files.atomic import replacing_dir
from ..ui.progress import Progress, quiet
from .prepare import PROOF_TEXTS, Exported, ExportInputError, ProofFailed, load_unmerged, proof_texts
from .proof import check_onnx, with_adapter_effect, write_unproven

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ONNX_FILE = "model.onnx"
DTYPES = ("f32", "f16", "q8_0")  # the exported weights' types (TOLERANCE has a bound for each)
REFUSED = {
    "bf16": "onnxruntime's CPU provider has no bfloat16 kernels for these graphs' elementwise ops (Add and Mul, "
    "opset 14: 'Could not find an implementation for Add(14)' in onnxruntime 1.32); use f16 or q8_0"
}
# Max |Δlogit| allowed, per dtype. A lossy dtype's bound scales with the logits: it is TOLERANCE[dtype] times the
# largest |logit| lorakit computes on the proof inputs (at least 1), as for GGUF. Measured (docs/export.md) on the
# MiniLM seq-cls test models / the tiny Llama, at most: f32 8e-6 / 9e-8; f16 2.6e-3 / 2.5e-4; q8_0 4.6e-2 / 3.1e-3.
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "q8_0": 1e-1}
RELATIVE = frozenset({"f16", "q8_0"})
Q8_BLOCK = 32  # weights per scale in q8_0 (as GGUF's)
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
    dtype: str = "f32",
    tolerance: float | None = None,
    progress: Progress | None = None,
) -> Exported:
    """Load the base with its adapter(s) (`load_unmerged`) and export it to `out` (`export_loaded`)."""
    require_runtime()
    check_dtype(dtype)
    model, tok, task = load_unmerged(model_dir, adapter_dirs, progress=progress)
    return export_loaded(model, tok, task, out, texts=texts, dtype=dtype, tolerance=tolerance, progress=progress)


def check_dtype(dtype: str) -> str:
    """`dtype` if ONNX export writes it; else ExportInputError with the reason (bf16) or the supported ones."""
    if dtype in REFUSED:
        raise ExportInputError(f"dtype {dtype} is refused for ONNX export: {REFUSED[dtype]}")
    if dtype not in DTYPES:
        raise ExportInputError(f"dtype {dtype!r} is not supported for ONNX export; expected one of {DTYPES}")
    return dtype


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

    `dtype` is the weights' type in the graph: f32, f16 or q8_0 (onnxruntime's weight-only int8; see the module
    docstring); bf16 raises ExportInputError with the reason. Raises ProofFailed (and writes nothing at `out`) when
    onnxruntime's logits differ from the unmerged f32 model's by more than the tolerance (`TOLERANCE`, relative for
    lossy dtypes) or an argmax disagrees other than at a tie. The model is merged in place.
    """
    from ..adapters import disable_adapters
    from ..model import merge

    progress = progress or quiet()
    require_runtime()
    check_dtype(dtype)
    out = Path(out)
    inputs = proof_inputs(tok, proof_texts(tok, texts))
    with progress.task("computing lorakit's logits (adapters unmerged, and the base alone)"), torch.no_grad():
        reference = _Logits(model, tuple(inputs), task)(*inputs.values()).float()
        with disable_adapters(model):
            base = _Logits(model, tuple(inputs), task)(*inputs.values()).float()
    real = inputs["attention_mask"].bool() if task == "causal-lm" else slice(None)
    effect = float((reference - base)[real].abs().max())
    if tolerance is None:
        scale = max(1.0, float(reference.abs().max())) if dtype in RELATIVE else 1.0
        tolerance = TOLERANCE[dtype] * scale
    with progress.task("merging the adapters into the base"):
        merge(model)
    with replacing_dir(out) as new:
        onnx_file = _write_graph(model, inputs, task, new, out, dtype, progress)
        with progress.task("checking the ONNX model in onnxruntime (CPU)"):
            proof = check_onnx(onnx_file, inputs, reference, task=task, dtype=dtype, tolerance=tolerance)
        # no base graph to run: onnxruntime's base is taken as lorakit's, so its whole error counts against the effect
        proof = with_adapter_effect(proof, effect, proof.max_abs_diff)
        proof.write(new / "proof.json")
        if not proof.passed:
            raise ProofFailed(proof)
        tok.save_pretrained(new)
        model.config.save_pretrained(new)
    return Exported(out, out / ONNX_FILE, task, (proof,))


def export_unproven(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    task: str,
    out: str | Path,
    *,
    reason: str,
    dtype: str = "f32",
    progress: Progress | None = None,
) -> Exported:
    """Write the same files as export_loaded without running them; proof.json says `reason` (`"passed": null`).

    f32 needs no onnxruntime (f16 and q8_0 are lowered with its tools). The model is merged in place.
    """
    from ..model import merge

    progress = progress or quiet()
    require_runtime(prove=False, dtype=dtype)
    check_dtype(dtype)
    out = Path(out)
    inputs = proof_inputs(tok, proof_texts(tok, PROOF_TEXTS))  # example inputs to trace the graph with
    with progress.task("merging the adapters into the base"):
        merge(model)
    with replacing_dir(out) as new:
        _write_graph(model, inputs, task, new, out, dtype, progress)
        write_unproven(new / "proof.json", reason, artefacts=[ONNX_FILE], task=task, dtype=dtype)
        tok.save_pretrained(new)
        model.config.save_pretrained(new)
    return Exported(out, out / ONNX_FILE, task, (), unproven=reason)


def require_runtime(prove: bool = True, dtype: str = "f32") -> None:
    """ImportError naming what to install, unless onnx and onnxscript (torch's exporter) import, and onnxruntime
    too to `prove` or to lower the weights to a `dtype` other than f32."""
    import importlib.util

    needed = ("onnx", "onnxscript") + (("onnxruntime",) if prove or dtype != "f32" else ())
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"ONNX export needs {', '.join(missing)}: pip install 'lorakit[export]', or bash scripts/setup.sh dev in "
            "a lorakit checkout"
        )


def _write_graph(
    model: PreTrainedModel,
    inputs: dict[str, torch.Tensor],
    task: str,
    new: Path,
    out: Path,
    dtype: str,
    progress: Progress,
) -> Path:
    """Export the merged `model` to `new/ONNX_FILE` in `dtype` (shown as under `out`); returns the file."""
    onnx_file = new / ONNX_FILE
    f32_file = new / ".f32" / ONNX_FILE if dtype != "f32" else onnx_file
    with progress.task(f"exporting {out / ONNX_FILE} with torch.onnx"):
        f32_file.parent.mkdir(exist_ok=True)
        _export(_Logits(model, tuple(inputs), task).eval(), inputs, f32_file)
    if dtype != "f32":
        with progress.task(f"converting the graph's weights to {dtype} with onnxruntime's tools"):
            _lower(f32_file, onnx_file, dtype)
            shutil.rmtree(f32_file.parent)
    return onnx_file


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


def _lower(f32_file: Path, onnx_file: Path, dtype: str) -> None:
    """The f32 graph's weights as `dtype` in `onnx_file` (its weights in `model.onnx.data` beside it)."""
    import onnx

    model = onnx.load(str(f32_file))  # with its external weights
    if dtype == "f16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=True)  # int64 ids in, f32 logits out, as in f32
    else:
        with _root_logging_kept():
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            logging.getLogger().setLevel(logging.WARNING)  # its import set INFO: it logs every node it visits
            quantiser = MatMulNBitsQuantizer(model, bits=8, block_size=Q8_BLOCK, is_symmetric=True)
            quantiser.process()
        model = quantiser.model.model
    onnx.save(model, str(onnx_file), save_as_external_data=True, location=onnx_file.name + ".data")


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """The root logger's level and handlers restored after the block (onnxruntime's quantiser sets them on import)."""
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers
