"""Which transformers architectures lorakit writes as GGUF, and as which llama.cpp architecture (and the GGUF
writers' error and config.json reader, which every GGUF module shares).

llama.cpp reads a model by its `general.architecture` and builds a graph per architecture (`src/models/*.cpp`);
lorakit writes the tensors and hyper-parameters of the ones it proves in llama.cpp:
- "llama": Llama and Mistral (dense), and Mixtral (the same graph with `ffn_gate_inp` + `ffn_*_exps` per layer:
  llama.cpp's llama builder takes the MoE branch when `expert_count` > 0). q/k rows are permuted to GGML's
  interleaved RoPE (convert_hf_to_gguf.py's `LlamaModel.permute`).
- "qwen3moe": Qwen3-MoE (q/k RMSNorm, NEOX RoPE: no permutation; every layer MoE, top-k weights renormalised:
  `build_moe_ffn(..., norm_w = true, ...)` in `src/models/qwen3moe.cpp`).
Any other architecture is refused naming it and listing these; MoE families llama.cpp has a graph for but lorakit
does not write (gpt-oss's interleaved, clamped gate and biases; Qwen2-MoE's shared expert; DeepSeek's grouped
routing) are refused saying so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoraFileError


class GgufExportError(LoraFileError):
    """An adapter or base model that llama.cpp's adapter GGUF cannot express (the message says why)."""


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """A transformers model directory's config.json as a dict; LoraFileError naming the file when it is not one."""
    return read_json_object(model_dir / "config.json", "a transformers model directory holds config.json")


def read_json_object(path: Path, why: str, error: type[LoraFileError] = LoraFileError) -> dict[str, Any]:
    """A JSON object from `path`; `error` naming the file when it is missing (saying `why` it is needed), is not
    JSON, or holds something else."""
    if not path.is_file():
        raise error(f"{path}: no such file ({why})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class GgufArch:
    """How one transformers architecture is written: llama.cpp's name, gguf's MODEL_ARCH member, RoPE order, MoE."""

    name: str  # general.architecture
    model_arch: str  # gguf.MODEL_ARCH member (its tensor-name map)
    permute_qk: bool  # GGML interleaved RoPE ("llama"): q/k rows permuted from HF's rotate-half order
    moe: bool  # fused 3-D experts + router per layer


LLAMA = GgufArch("llama", "LLAMA", permute_qk=True, moe=False)
ARCHITECTURES: dict[str, GgufArch] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "MixtralForCausalLM": GgufArch("llama", "LLAMA", permute_qk=True, moe=True),
    "Qwen3MoeForCausalLM": GgufArch("qwen3moe", "QWEN3MOE", permute_qk=False, moe=True),
}
DENSE = tuple(a for a, g in ARCHITECTURES.items() if not g.moe)
MOE = tuple(a for a, g in ARCHITECTURES.items() if g.moe)

# MoE families llama.cpp runs from its own converter's files, and why lorakit's writer does not produce them.
UNWRITTEN_MOE = {
    "GptOssForCausalLM": "gpt-oss's experts (interleaved, clamped SwiGLU gate, expert biases, attention sinks)",
    "Qwen2MoeForCausalLM": "Qwen2-MoE's shared expert and its sigmoid gate",
    "DeepseekV3ForCausalLM": "DeepSeek-V3's grouped, biased routing and MLA attention",
    "DeepseekV2ForCausalLM": "DeepSeek-V2's grouped routing and MLA attention",
    "Qwen3NextForCausalLM": "Qwen3-Next's linear-attention layers and shared expert",
}


def model_hparams(model_dir: Path) -> tuple[dict[str, Any], GgufArch]:
    """(config.json, its GgufArch) of a model directory; GgufExportError when lorakit does not write its kind."""
    try:
        hparams = read_model_config(model_dir)
    except LoraFileError as e:  # no config.json, not JSON
        raise GgufExportError(str(e)) from None
    return hparams, gguf_arch(hparams, model_dir / "config.json")


def gguf_arch(hparams: dict[str, Any], where: Path) -> GgufArch:
    """The GgufArch of a config.json's `architectures[0]`; GgufExportError naming it and listing what is supported.

    Examples:
        >>> gguf_arch({"architectures": ["Qwen3MoeForCausalLM"]}, Path("config.json")).name
        'qwen3moe'
    """
    archs = hparams.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    supported = f"{', '.join(DENSE)}; the merged model (format gguf) also the mixture-of-experts {', '.join(MOE)}"
    if arch in UNWRITTEN_MOE:
        raise GgufExportError(
            f"{where}: architectures={archs!r}: a mixture-of-experts family lorakit does not write as GGUF "
            f"({UNWRITTEN_MOE[arch]} are not in its writer); lorakit's GGUF export (model and adapter) supports "
            f"{supported}. Use llama.cpp's own convert_hf_to_gguf.py on the merged model (lorakit merge), unproven "
            "by lorakit"
        )
    raise GgufExportError(
        f"{where}: architectures={archs!r}: lorakit's GGUF export (model and adapter) supports {supported}"
    )
