"""A lorakit/PEFT adapter as llama.cpp's LoRA-adapter GGUF, the layout its `convert_lora_to_gguf.py` writes.

The layout (llama.cpp `convert_lora_to_gguf.py`, `src/llama-adapter.{h,cpp}`, gguf-py `constants.py`):
- metadata: `general.architecture` = "llama", `general.type` = "adapter", `adapter.type` = "lora",
  `adapter.lora.alpha` (float32): ONE alpha for the whole adapter.
- tensors: the base model's GGUF tensor name plus `.lora_a` / `.lora_b` (`blk.N.attn_q.weight.lora_a`), named
  through gguf's `TensorNameMap` for the architecture. `lora_a` is PEFT's A as stored, numpy shape (r, d_in)
  (GGML ne = [d_in, r]); `lora_b` is PEFT's B, (d_out, r) (ne = [r, d_out]).
- llama.cpp computes `W x + s · (alpha / r) · B (A x)` per module, r read from the tensor (`b->ne[0]`), s the
  user's `--lora-scaled` factor (1 for `--lora`); alpha = 0 means no alpha/r factor.
- token_embd: llama.cpp gathers token rows of `lora_a`, so it holds PEFT's `lora_embedding_A` transposed,
  (vocab, r); `lora_b` is `lora_embedding_B`, (dim, r) (`llm_build_inp_embd`, convert_lora_to_gguf.py).
- Llama's q_proj / k_proj rows are permuted from HF's rotate-half order to GGML's interleaved RoPE
  (`LlamaModel.permute` in `convert_hf_to_gguf.py`), so their B rows get the same permutation.

lorakit's scaling per module is `alpha_m / r_m` (or `alpha_m / sqrt(r_m)` with rsLoRA, alpha_m and r_m from
alpha_pattern / rank_pattern). With one written alpha, each B is multiplied by `scaling_m / (alpha / r_m)`, so
`(alpha / r_m) · B' A` is exactly lorakit's delta W. llama.cpp has no DoRA, no biases in an adapter, and no
modules_to_save (full weights): those adapters are refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import LoraFileError
from ..files import peft_format, provenance
from ..files.atomic import replacing
from ..files.peft_format import AdapterFile, read_adapter, split_key
from .gguf_arch import MOE, GgufExportError, read_json_object, read_model_config

__all__ = ["GgufExportError", "read_json_object", "read_model_config"]  # re-exported: their callers import them here
from ..ui import progress as progress_mod
from ..ui.progress import Progress

# HF architectures whose tensors convert_hf_to_gguf.py writes as gguf's LLAMA architecture (its LlamaModel)
LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
DTYPES = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class GgufAdapterReport:
    """What `write_gguf_adapter` wrote: the global alpha, tensor names, and the modules whose B was rescaled."""

    path: Path
    alpha: float
    tensors: dict[str, tuple[int, ...]]  # GGUF tensor name -> numpy shape
    folded: dict[str, float]  # module -> the factor B was multiplied by (modules with factor 1 are absent)


def write_gguf_adapter(
    adapter_dir: str | Path,
    base_dir: str | Path,
    out: str | Path,
    *,
    dtype: str = "f32",
    progress: Progress | None = None,
    shown_as: str | Path | None = None,
) -> GgufAdapterReport:
    """Write the adapter at `adapter_dir` (for the model at `base_dir`) as llama.cpp's LoRA GGUF at `out`.

    Only `base_dir/config.json` is read (architecture, head counts, tied embeddings). The file is written
    atomically: on any error `out` is left as it was.

    Args:
        adapter_dir: a PEFT-layout adapter directory (what `lorakit` saves).
        base_dir: the base model's directory (config.json).
        out: the .gguf file to write.
        dtype: "f32", "f16" or "bf16" for the A and B tensors.
        progress: progress reporter (None: quiet).
        shown_as: the name progress gives `out` (the final path, when `out` is inside a temporary directory).

    Returns:
        A `GgufAdapterReport`.
    """
    import gguf  # the `export` extra; imported here so the rest of lorakit does not need it

    progress = progress or progress_mod.quiet()
    if dtype not in DTYPES:
        raise GgufExportError(f"dtype {dtype!r} is not supported for an adapter GGUF: expected one of {DTYPES}")
    alpha, tensors, folded = _convert(gguf, Path(adapter_dir), Path(base_dir), progress)
    out = Path(out)
    with progress.task(f"writing {shown_as or out}"), replacing(out) as tmp:
        _write(gguf, tmp, tensors, alpha, dtype, Path(adapter_dir).name)
    return GgufAdapterReport(out, alpha, {k: tuple(v.shape) for k, v in tensors.items()}, folded)


def check_adapter(adapter_dir: str | Path, base_dir: str | Path) -> None:
    """Raise GgufExportError unless `write_gguf_adapter` can write this adapter for this base (nothing is written)."""
    import gguf

    _convert(gguf, Path(adapter_dir), Path(base_dir), progress_mod.quiet())


def _convert(
    gguf: Any, adapter_dir: Path, base_dir: Path, progress: Progress
) -> tuple[float, dict[str, np.ndarray], dict[str, float]]:
    """(alpha, {GGUF name: array}, {module: factor folded into B}) for the adapter, or GgufExportError saying why."""
    hparams = llama_hparams(Path(base_dir))
    file = _read_exportable(adapter_dir)
    pairs = _lora_pairs(file, base_dir)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(hparams["num_hidden_layers"]))
    alpha = float(file.spec.config.alpha)
    tensors: dict[str, np.ndarray] = {}
    folded: dict[str, float] = {}
    with progress.task(f"converting {len(pairs)} LoRA modules to GGUF", total=len(pairs), unit="modules") as task:
        for module in sorted(pairs, key=_natural):
            A, B = _checked_pair(file, module, pairs[module], hparams, base_dir)
            name = names.get_name(module + ".weight", try_suffixes=(".weight",))
            if name is None:
                raise GgufExportError(f"{file.where}: module {module!r} has no tensor in llama.cpp's llama layout")
            _check_shape(file, module, A, B, hparams, base_dir)
            rank = A.shape[0]
            # what llama.cpp's alpha / r misses of lorakit's scaling
            factor = file.spec.config.for_module(module).scaling / (alpha / rank)
            if factor != 1.0:
                folded[module] = factor
            a, b = _gguf_pair(module, A, B, factor, hparams)
            tensors[name + ".lora_a"] = a
            tensors[name + ".lora_b"] = b
            task.advance()
    return alpha, tensors, folded


def _read_exportable(adapter_dir: Path) -> AdapterFile:
    """The adapter, its provenance checked; GgufExportError for DoRA or modules_to_save (llama.cpp has neither)."""
    file = read_adapter(adapter_dir)
    if file.sidecar is not None:  # lorakit.json: the config and the bytes must be the ones that were saved
        provenance.check_config(file.sidecar, peft_format.computation_fields(file.spec.raw), file.config_path)
        provenance.check_unchanged(file.sidecar, file.tensors, file.where)
    spec = file.spec
    where = file.config_path
    if spec.config.use_dora:
        raise GgufExportError(
            f"{where}: use_dora=true: llama.cpp's LoRA adapters have no DoRA magnitude (it computes W + s·B·A only);"
            ' merge the adapter into the model and export that (format "gguf") instead'
        )
    if spec.modules_to_save:
        raise GgufExportError(
            f"{where}: modules_to_save={spec.modules_to_save}: a llama.cpp adapter holds only lora_a/lora_b pairs "
            '(convert_lora_to_gguf.py refuses full weights); merge into the model and export that (format "gguf")'
        )
    return file


def _lora_pairs(file: AdapterFile, base_dir: Path) -> dict[str, dict[str, Tensor]]:
    """{module: {"lora_A": A, "lora_B": B}} of the file; GgufExportError for any other tensor but an unchanged
    copy of a base weight."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in file.tensors.items():
        parts = split_key(key)
        if parts is not None and parts[1] == "base_weight":  # PEFT saves the embeddings whole beside their LoRA
            _check_base_copy(file.where, key, t, base_dir, parts[0] + ".weight")
            continue  # the base's own weight: llama.cpp reads it from the model file
        if parts is None or parts[1] not in ("lora_A", "lora_B"):
            raise GgufExportError(
                f"{file.where}: tensor {key!r}: a llama.cpp adapter holds only lora_A/lora_B pairs (no biases, "
                'no full weights); merge into the model and export that (format "gguf")'
            )
        module, tensor, _ = parts
        pairs.setdefault(module, {})[tensor] = t
    return pairs


def _checked_pair(
    file: AdapterFile, module: str, pair: dict[str, Tensor], hparams: dict[str, Any], base_dir: Path
) -> tuple[Tensor, Tensor]:
    """(A, B) of one module; GgufExportError unless both are there, matrices of one rank, and not on a tied lm_head."""
    A, B = pair.get("lora_A"), pair.get("lora_B")
    if A is None or B is None or A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise GgufExportError(f"{file.where}: {module!r}: expected lora_A (r, d_in) and lora_B (d_out, r)")
    if module == "lm_head" and hparams.get("tie_word_embeddings", False):
        raise GgufExportError(
            f"{file.config_path}: LoRA on lm_head, but {base_dir}/config.json ties lm_head to the embeddings: "
            "llama.cpp has no separate output tensor to adapt (llama.cpp issue #9065)"
        )
    return A, B


def _check_shape(file: AdapterFile, module: str, A: Tensor, B: Tensor, hparams: dict[str, Any], base_dir: Path) -> None:
    """GgufExportError when the module's delta W is not the shape config.json gives its weight (another model's)."""
    want = _weight_shape(module, hparams)
    if module.endswith("embed_tokens"):  # PEFT's A (r, vocab), B (dim, r): delta W is (B A)^T
        want = None if want is None else (want[1], want[0])
    if want is not None and (B.shape[0], A.shape[1]) != want:
        raise GgufExportError(
            f"{file.where}: {module!r} adapts a ({B.shape[0]}, {A.shape[1]}) weight, but {base_dir}/config.json"
            f" gives that module a {want} weight: the adapter is for another model"
        )


def _gguf_pair(
    module: str, A: Tensor, B: Tensor, factor: float, hparams: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """(lora_a, lora_b) as llama.cpp reads them: B scaled by `factor`, q/k rows permuted, token_embd's A transposed."""
    b = B.float() * factor if factor != 1.0 else B.float()
    if module.endswith("self_attn.q_proj"):
        b = rope_permute(b, int(hparams["num_attention_heads"]))
    elif module.endswith("self_attn.k_proj"):
        b = rope_permute(b, int(hparams.get("num_key_value_heads") or hparams["num_attention_heads"]))
    # llama.cpp gathers token rows of lora_a, so token_embd's A is stored transposed (llm_build_inp_embd)
    a = A.float().T if module.endswith("embed_tokens") else A.float()
    return a.contiguous().numpy(), b.contiguous().numpy()


def _check_base_copy(where: str, key: str, copy: Tensor, base_dir: Path, name: str) -> None:
    """GgufExportError unless the adapter file's copy of a base weight (PEFT's default with LoRA on embeddings,
    `save_embedding_layers="auto"`) equals the base's own `name`: a changed one is a full weight llama.cpp's
    adapter cannot hold."""
    from safetensors import safe_open

    for f in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            if name in st.keys():  # noqa: SIM118 (safe_open has keys(), not __contains__)
                base = st.get_tensor(name)
                break
    else:
        raise GgufExportError(f"{where}: tensor {key!r} copies {name!r}, which {base_dir} does not hold")
    if base.shape != copy.shape or not torch.equal(base.to(copy.dtype), copy):
        diff = (
            "shape differs"
            if base.shape != copy.shape
            else f"max |Δ| {float((base.float() - copy.float()).abs().max()):.2g}"
        )
        raise GgufExportError(
            f"{where}: tensor {key!r} is a full copy of {name!r} that differs from {base_dir}'s ({diff}): a "
            'llama.cpp adapter holds only lora_a/lora_b pairs; merge into the model and export that (format "gguf")'
        )


def rope_permute(rows: Tensor, n_head: int) -> Tensor:
    """HF's rotate-half row order of a q/k projection in GGML's interleaved order (convert_hf_to_gguf's permute)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _weight_shape(module: str, hparams: dict[str, Any]) -> tuple[int, int] | None:
    """(d_out, d_in) of a Llama module's weight from config.json; None for a module this does not know."""
    hidden, n_head = int(hparams["hidden_size"]), int(hparams["num_attention_heads"])
    n_kv = int(hparams.get("num_key_value_heads") or n_head)
    head_dim = int(hparams.get("head_dim") or hidden // n_head)
    inter = int(hparams.get("intermediate_size") or 0)
    shapes = {
        "q_proj": (n_head * head_dim, hidden),
        "k_proj": (n_kv * head_dim, hidden),
        "v_proj": (n_kv * head_dim, hidden),
        "o_proj": (hidden, n_head * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
        "lm_head": (int(hparams.get("vocab_size") or 0), hidden),
        "embed_tokens": (int(hparams.get("vocab_size") or 0), hidden),
    }
    return shapes.get(module.rpartition(".")[2])


def _natural(module: str) -> tuple[Any, ...]:
    """Sort key that puts layer 2 before layer 10."""
    return tuple(int(p) if p.isdigit() else p for p in module.split("."))


def llama_hparams(base_dir: Path) -> dict[str, Any]:
    """The base model's config.json, checked to be an architecture llama.cpp reads as "llama"."""
    path = base_dir / "config.json"
    try:
        hparams = read_model_config(base_dir)
    except LoraFileError as e:
        raise GgufExportError(str(e)) from None
    archs = hparams.get("architectures")
    if isinstance(archs, list) and archs and archs[0] in MOE:
        raise GgufExportError(
            f"{path}: architectures={archs!r}: a mixture-of-experts base; llama.cpp applies LoRA to expert tensors "
            "(build_lora_mm_id), but lorakit writes no adapter GGUF for " + ", ".join(MOE) + ": export the merged "
            'model instead (format "gguf")'
        )
    if not isinstance(archs, list) or not archs or archs[0] not in LLAMA_ARCHITECTURES:
        raise GgufExportError(
            f"{path}: architectures={archs!r}: lorakit's GGUF export (model and adapter) supports "
            + ", ".join(LLAMA_ARCHITECTURES)
        )
    return hparams


def _write(gguf: Any, path: Path, tensors: dict[str, np.ndarray], alpha: float, dtype: str, name: str) -> None:
    """The GGUF file itself: llama.cpp's adapter metadata, then each tensor in `dtype`."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # convert_lora_to_gguf.py writes both
    writer.add_type(gguf.GGUFType.ADAPTER)  # general.type = "adapter"
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, data in tensors.items():
        if dtype == "f16":
            writer.add_tensor(name, data.astype(np.float16))
        elif dtype == "bf16":
            bf16 = gguf.GGMLQuantizationType.BF16
            writer.add_tensor(name, gguf.quants.quantize(data, bf16), raw_dtype=bf16)
        else:
            writer.add_tensor(name, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
