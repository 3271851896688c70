"""A Llama-family or mixture-of-experts transformers model directory (a merged one) as a llama.cpp GGUF model file.

What llama.cpp's `convert_hf_to_gguf.py` (its `LlamaModel` and `TextModel.set_gguf_parameters`) writes for
`LlamaForCausalLM`, narrowed to what lorakit proves: gguf's LLAMA architecture, tensor names from gguf's
`TensorNameMap`, q/k projection rows permuted from HF's rotate-half order to GGML's interleaved RoPE
(`LlamaModel.permute`), 1-D tensors (norms, biases) always f32, no `output.weight` when lm_head is tied (llama.cpp
then reads token_embd), and the vocabulary as a "gpt2" (byte-level BPE) tokenizer with the merges and special
ids gguf's `SpecialVocab` reads from the directory, and the pre-tokenizer llama.cpp must run (gguf_vocab.py). RoPE
scaling (llama3, yarn, ...), sliding-window attention and quantised checkpoints are refused with the reason.
Mixtral and Qwen3-MoE go through the same path (gguf_arch.py: which llama.cpp architecture; gguf_moe.py: the
experts stacked as llama.cpp's `ffn_*_exps` tensors and the expert keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ..files import safetensors
from ..files.atomic import replacing
from ..ui import progress as progress_mod
from ..ui.progress import Progress
from .gguf_adapter import GgufExportError, rope_permute
from .gguf_arch import GgufArch, model_hparams
from .gguf_moe import check_moe, expert_counts, pop_expert_tensors, write_moe_params
from .gguf_vocab import pre_tokenizer, write_vocab

DTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class GgufModelReport:
    """What `write_gguf_model` wrote: the file and each tensor's GGUF name, numpy shape and type."""

    path: Path
    tensors: dict[str, tuple[tuple[int, ...], str]]


def write_gguf_model(
    model_dir: str | Path,
    out: str | Path,
    *,
    dtype: str = "f16",
    progress: Progress | None = None,
    shown_as: str | Path | None = None,
) -> GgufModelReport:
    """Write the Llama-family or MoE model at `model_dir` (config.json, *.safetensors, tokenizer) as GGUF at `out`.

    Args:
        model_dir: a transformers model directory (for a fine-tuned model: the merged one).
        out: the .gguf file to write (atomically: on error `out` is left as it was).
        dtype: "f32", "f16", "bf16" or "q8_0" for the 2-D weights (a row length not a multiple of 32 stays f16
            under q8_0, as convert_hf_to_gguf.py does).
        progress: progress reporter (None: quiet).
        shown_as: the name progress gives `out` (the final path, when `out` is inside a temporary directory).

    Returns:
        A `GgufModelReport`.
    """
    import gguf  # the `export` extra

    progress = progress or progress_mod.quiet()
    model_dir = Path(model_dir)
    if dtype not in DTYPES:
        raise GgufExportError(f"dtype {dtype!r} is not supported for a GGUF model: expected one of {DTYPES}")
    hparams, arch = model_hparams(model_dir)
    _check_supported(model_dir, hparams, arch)
    state = _read_state(model_dir, progress, "reading the merged model" if shown_as else f"reading {model_dir}")
    if hparams.get("tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    tensors = _gguf_tensors(gguf, state, hparams, arch, model_dir)
    out = Path(out)
    with progress.task(f"writing {shown_as or out}", total=len(tensors), unit="tensors") as task, replacing(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=arch.name)
        _write_params(gguf, writer, hparams, model_dir.name, dtype)
        if arch.moe:
            write_moe_params(writer, hparams)
        write_vocab(gguf, writer, model_dir, int(hparams["vocab_size"]))
        types: dict[str, tuple[tuple[int, ...], str]] = {}
        for name, data in tensors.items():
            types[name] = _add_tensor(gguf, writer, name, data, dtype)
            task.advance()
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GgufModelReport(out, types)


def _read_state(model_dir: Path, progress: Progress, reading: str) -> dict[str, Tensor]:
    """Every tensor of the directory's *.safetensors files (GgufExportError when it has none)."""
    state: dict[str, Tensor] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GgufExportError(f"{model_dir}: no *.safetensors weights (lorakit never loads pickled weights)")
    with progress.task(reading, total=len(files), unit="files") as task:
        for f in files:
            state.update(safetensors.read(f)[0])
            task.advance()
    return state


def _gguf_tensors(
    gguf: Any, state: dict[str, Tensor], hparams: dict[str, Any], arch: GgufArch, model_dir: Path
) -> dict[str, np.ndarray]:
    """{GGUF name: float32 array} in key order, q/k rows in GGML's RoPE order where the architecture needs it,
    experts stacked (rotary_emb.inv_freq left out)."""
    n_head = int(hparams["num_attention_heads"])
    n_kv = int(hparams.get("num_key_value_heads") or n_head)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.model_arch), int(hparams["num_hidden_layers"]))
    tensors: dict[str, np.ndarray] = {}
    if arch.moe:
        tensors.update(pop_expert_tensors(state, expert_counts(hparams)[0], model_dir))
    for key in sorted(state):
        if key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp from rope.freq_base
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GgufExportError(f"{model_dir}: tensor {key!r} has no place in llama.cpp's {arch.name} layout")
        t = state[key].float()
        if arch.permute_qk and ".self_attn.q_proj." in key:
            t = rope_permute(t, n_head)
        elif arch.permute_qk and ".self_attn.k_proj." in key:
            t = rope_permute(t, n_kv)
        tensors[name] = t.contiguous().numpy()
    return tensors


def _add_tensor(gguf: Any, writer: Any, name: str, data: np.ndarray, dtype: str) -> tuple[tuple[int, ...], str]:
    """Add one tensor in its GGML type (`_qtype`); return its numpy shape and the type's name."""
    qtype = _qtype(gguf, data, dtype)
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    return tuple(data.shape), qtype.name


def check_model(model_dir: str | Path) -> None:
    """Raise GgufExportError unless the model at `model_dir` is one `write_gguf_model` can write (before any work)."""
    model_dir = Path(model_dir)
    hparams, arch = model_hparams(model_dir)
    _check_supported(model_dir, hparams, arch)
    pre_tokenizer(model_dir / "tokenizer.json")


def _check_supported(model_dir: Path, hparams: dict[str, Any], arch: GgufArch) -> None:
    """Refuse what this writer does not reproduce: quantised weights, RoPE scaling, sliding windows, MoE variants."""
    where = model_dir / "config.json"
    if hparams.get("quantization_config"):
        raise GgufExportError(f"{where}: a quantised checkpoint: export the full-precision model (merge first)")
    rope = hparams.get("rope_parameters") or hparams.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind != "default":
        raise GgufExportError(f"{where}: rope_type {kind!r}: only unscaled RoPE is exported to GGUF by lorakit")
    if arch.moe:
        check_moe(hparams, where)
    window, context = hparams.get("sliding_window"), int(hparams.get("max_position_embeddings") or 0)
    if hparams.get("use_sliding_window") is False:  # Qwen configs carry a window they do not use
        window = None
    if window is not None and int(window) < context:  # Mistral v0.1-style: each token sees the last `window` only
        raise GgufExportError(
            f"{where}: sliding_window={window} is smaller than the context ({context} positions): llama.cpp's "
            "llama graph attends to every earlier position, so past the window it would compute another model; "
            "lorakit does not export sliding-window attention to GGUF"
        )


def _qtype(gguf: Any, data: np.ndarray, dtype: str) -> Any:
    """The GGML type of one tensor: f32 for 1-D ones, else `dtype` (q8_0 falls back to f16 for odd rows)."""
    q = gguf.GGMLQuantizationType
    if data.ndim <= 1 or dtype == "f32":
        return q.F32
    if dtype == "q8_0":
        return q.Q8_0 if data.shape[-1] % 32 == 0 else q.F16
    return q.BF16 if dtype == "bf16" else q.F16


def _write_params(gguf: Any, writer: Any, hparams: dict[str, Any], name: str, dtype: str) -> None:
    """llama.* hyper-parameters, as TextModel.set_gguf_parameters and LlamaModel write them."""
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    hidden, n_head = int(hparams["hidden_size"]), int(hparams["num_attention_heads"])
    head_dim = int(hparams.get("head_dim") or hidden // n_head)
    rope = hparams.get("rope_parameters") or {}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(getattr(gguf.LlamaFileType, file_types[dtype]))
    writer.add_block_count(int(hparams["num_hidden_layers"]))
    writer.add_context_length(int(hparams["max_position_embeddings"]))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(hparams["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(hparams.get("num_key_value_heads") or n_head))
    writer.add_rope_freq_base(float(rope.get("rope_theta", hparams.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(hparams["rms_norm_eps"]))
    writer.add_vocab_size(int(hparams["vocab_size"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
