"""Expert adapters (PEFT `target_parameters` on fused 3-D expert weights) in each runtime: who reads them, in which
layout.

PEFT saves a LoRA on a 3-D parameter P (E, d1, d2) flat, under its ParamWrapper's nested module names
(`...mlp.experts.base_layer.lora_A`, `...mlp.experts.lora_A`): lora_A (E·r, in), lora_B (out, r·E). Which of d1, d2
is "in" changed in PEFT 0.19 (peft#3165; NVIDIA-NeMo/Automodel#3626 converts both): before, in = d1 always; since,
in = d2 unless the experts are stored transposed (gpt-oss). The file says which through
adapter_config.json's `peft_version` (lorakit writes the current layout and reads both). Runtimes, as their trackers
say (December 2026):
- vLLM: stock releases drop these adapters and run the base experts without an error (vllm#41384: capbench 0.018
  instead of 0.68), or fail in set_lora with a shape mismatch; vllm#52198 (open) parses `target_parameters` and
  reads the pre-0.19 [E, in = d1, out = d2] order.
- SGLang: its loader does not match the ParamWrapper names, so the expert LoRA is skipped (an error only with
  --lora-strict-loading); sglang#25528 and its loader-only split sglang#27381 add a converter (closed).
- llama.cpp: its MoE graphs apply LoRA to expert tensors (`build_lora_mm_id` on `ffn_*_exps`, lora_a (E, r, in),
  lora_b (E, out, r)), but no converter lorakit proves writes them: the merged model is exported instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

VLLM_SILENT = "https://github.com/vllm-project/vllm/pull/41384"
VLLM_FIX = "https://github.com/vllm-project/vllm/pull/52198"
SGLANG_FIX = "https://github.com/sgl-project/sglang/pull/25528"
LLAMA_CPP_MM_ID = "https://github.com/ggml-org/llama.cpp/blob/master/src/llama-graph.cpp"  # build_lora_mm_id
PEFT_LAYOUT = "https://github.com/huggingface/peft/pull/3165"
_MERGE = "lorakit merge --model BASE --adapter ADAPTER --out DIR (the experts merged exactly), then serve DIR"
_GGUF_MERGED = "lorakit export --format gguf (merged; Qwen3-MoE and Mixtral, proven in llama.cpp)"
_CONVERT = "lorakit load_adapters reads the pre-0.19 layout (converting it, with a note); save_adapters writes 0.19's"


@dataclass(frozen=True)
class Experts:
    """The expert side of an adapter: its target_parameters rules, the modules holding expert factors, the layout."""

    rules: tuple[str, ...]
    modules: tuple[str, ...]
    layout: str  # "PEFT >= 0.19", "PEFT <= 0.18" or "unknown (...)"


def experts_of(config: dict[str, Any], modules: Iterable[str]) -> Experts | None:
    """The adapter's Experts from its adapter_config.json and module names; None without target_parameters.

    Examples:
        >>> e = experts_of({"target_parameters": ["mlp.experts.down_proj"], "peft_version": "0.21.2"},
        ...                ["model.layers.0.mlp.experts", "model.layers.0.self_attn.q_proj"])
        >>> e.modules, e.layout
        (('model.layers.0.mlp.experts',), 'PEFT >= 0.19')
    """
    rules = tuple(config.get("target_parameters") or ())
    if not rules:
        return None
    owners = [m for m in modules if _targeted(_owner(m), rules)]
    return Experts(rules, tuple(owners), _layout(config))


def _owner(module: str) -> str:
    """The module a (possibly nested) ParamWrapper adapts: `...experts.base_layer` (a PEFT key) or
    `...experts (nested 1)` (files.inspect's row) -> `...experts`."""
    module = re.sub(r" \(nested \d+\)$", "", module)
    while module.endswith(".base_layer"):
        module = module[: -len(".base_layer")]
    return module


def _targeted(owner: str, rules: tuple[str, ...]) -> bool:
    """Whether some rule names a parameter of `owner` (PEFT: `key == rule or key.endswith("." + rule)` on
    `module.param`; lorakit: `re:` full match, the "all-experts" preset)."""
    params = {"gate_up_proj", "up_proj", "down_proj", "weight", *(r.rpartition(".")[2] for r in rules)}
    for rule in rules:
        if rule == "all-experts" and owner.rpartition(".")[2] == "experts":
            return True
        if rule.startswith("re:") and any(re.fullmatch(rule[3:], f"{owner}.{p}") for p in params):
            return True
        module = rule.rpartition(".")[0]
        if module and (owner == module or owner.endswith("." + module)):
            return True
    return False


def _layout(config: dict[str, Any]) -> str:
    """Which factor layout the file holds, from `peft_version` as files.expert_layout reads it (lorakit writes
    PEFT's current layout, with the first version that writes it)."""
    version = config.get("peft_version")
    if not isinstance(version, str):
        return "PEFT >= 0.19" if "lorakit" in config else "unknown (no peft_version in adapter_config.json)"
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?(.*)", version.partition("@")[0].strip())
    if m is None:
        return f"unknown (peft_version {version!r})"
    release = (int(m[1]), int(m[2]), int(m[3] or 0))
    if release < (0, 19):
        return "PEFT <= 0.18"
    if release == (0, 19, 0) and m[4]:  # a 0.19.0 pre-release: the change landed during them
        return f"unknown (peft_version {version}, a pre-release of the change)"
    return "PEFT >= 0.19"


def expert_rank(rows: int, config: dict[str, Any], n_experts: int | None) -> int:
    """An expert module's LoRA rank: lora_A's E·r rows over E (the config's `r` when E is not known)."""
    if n_experts:
        return rows // n_experts
    return int(config.get("r") or rows)


def hits(e: Experts) -> list[tuple[str, tuple[str, ...], dict[str, Any]]]:
    """(rule id, concerns, template values) of the expert rules (RULES below) for every target."""
    concerns = ("target_parameters", *e.modules)
    values = {"layout": e.layout}
    out = [(rule, concerns, values) for rule in ("vllm.experts", "sglang.experts", "llama.cpp.experts")]
    if e.layout == "PEFT <= 0.18":
        out.append(("peft.experts_old_layout", concerns, values))
    elif e.layout.startswith("unknown"):
        out.append(("peft.experts_unknown_layout", concerns, values))
    else:
        out.append(("peft.experts", concerns, values))
    return out


# Same shape as portability.RULES: id -> (target, severity, behaviour template, fix, source).
RULES: dict[str, tuple[str, str, str, str, str]] = {
    "vllm.experts": (
        "vllm", "differs", "LoRA on fused expert weights (target_parameters; this file: {layout} layout): stock vLLM "
        "drops it and runs the base experts without an error (vllm#41384), or fails in set_lora with a shape "
        "mismatch; vllm#52198 (open) reads it, in the pre-0.19 [E, in = d1, out = d2] order.", _MERGE,
        f"{VLLM_SILENT}, {VLLM_FIX}",
    ),
    "sglang.experts": (
        "sglang", "differs", "SGLang's LoRA loader does not match PEFT's ParamWrapper names (...experts.base_layer."
        "lora_A, ...experts.lora_A): the expert LoRA is skipped and the base experts run (an error only with "
        "--lora-strict-loading); sglang#25528 adds a converter.", _MERGE, SGLANG_FIX,
    ),
    "llama.cpp.experts": (
        "llama.cpp", "refused", "llama.cpp's MoE graphs apply LoRA to expert tensors (build_lora_mm_id: lora_a "
        "(E, r, in), lora_b (E, out, r) per ffn_*_exps tensor), but lorakit's gguf-adapter writer does not write "
        "expert factors ({layout} layout here).", _GGUF_MERGED, f"{LLAMA_CPP_MM_ID}, lorakit src/lorakit/export",
    ),
    "peft.experts": (
        "peft", "fine", "PEFT >= 0.19 loads the expert factors ({layout} layout: lora_A (E·r, in), lora_B "
        "(out, r·E), in/out as the experts compute).", "none", PEFT_LAYOUT,
    ),
    "peft.experts_old_layout": (
        "peft", "refused", "written in the {layout} layout (in = d1 always): PEFT >= 0.19 expects (out, in) factors "
        "for non-transposed experts (Qwen3-MoE, Mixtral) and fails with a size mismatch, or, where d1 == d2, loads "
        "them transposed.", _CONVERT, PEFT_LAYOUT,
    ),
    "peft.experts_unknown_layout": (
        "peft", "differs", "the expert factors' layout is {layout}: PEFT <= 0.18 and >= 0.19 read them differently "
        "(transposed per expert), so which one computes the trained model cannot be told from the file.",
        _CONVERT, PEFT_LAYOUT,
    ),
}  # fmt: skip
