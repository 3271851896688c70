"""Fused blocks for eager training: a transformers model's RMSNorm, SwiGLU MLP and RoPE swapped per instance.

`fuse_frozen_blocks(model)` replaces, in this model only (never transformers' classes or module functions):
- each RMSNorm module of a Llama-formula class (`w · x·rsqrt(mean x² + eps)`, fp32 then cast back; not
  Gemma's `(1 + w)`) with a `FusedRMSNorm` holding the same weight Parameter (`lorakit.fused.rms_norm`);
- each SwiGLU MLP (gate_proj / up_proj / down_proj, silu) with a `FusedSwiGLU` holding the same three
  submodules under the same names, LoRA-wrapped or not (`lorakit.fused.swiglu` between them);
- RoPE: transformers 5 routes an attention module's call of `apply_rotary_pos_emb` through a per-instance
  wrapper (`use_kernelized_func` puts it in the instance's `_kernel_funcs`, the hook hub kernels use); that
  entry becomes a `FusedRotary` (`lorakit.fused.rotary`). Without the `kernels` package there is no such hook
  and RoPE stays as it is (torch.compile fuses it).

State-dict keys, parameters and saved adapters are unchanged; the values are transformers' to rounding.
The classes are matched by name within transformers: each listed forward is checked against Llama's source by
the tests, so a transformers upgrade that changes one fails there, not silently here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..fused import rms_norm, rotary, swiglu
from ..train.device import resolve_device

if TYPE_CHECKING:
    from ..train.config import TrainConfig

# model families whose RMSNorm, MLP and apply_rotary_pos_emb are Llama's (tests/hf/test_fuse.py pins the sources)
_FAMILIES = ("Llama", "Mistral", "Mixtral", "Qwen2", "Qwen2Moe", "Qwen3", "Qwen3Moe", "SmolLM3", "Granite")
RMSNORMS = frozenset(f"{f}RMSNorm" for f in _FAMILIES)
MLPS = frozenset(f"{f}MLP" for f in _FAMILIES if f != "Mixtral")  # Mixtral's MLP is its experts
ATTENTIONS = frozenset(f"{f}Attention" for f in _FAMILIES)
_ROPE = "rotary_pos_emb"  # the layer name apply_rotary_pos_emb is declared under: its slot in `_kernel_funcs`


class FusedRMSNorm(nn.Module):
    """An RMSNorm module on `lorakit.fused.rms_norm`, holding the replaced module's weight Parameter."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        """w · (x · rsqrt(mean x² + eps)), computed in fp32 and cast back as transformers does."""
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        """The weight's shape and eps, as LlamaRMSNorm shows them."""
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class FusedSwiGLU(nn.Module):
    """A SwiGLU MLP, down(silu(gate(x)) · up(x)), holding the replaced MLP's three projections under their names."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: Tensor) -> Tensor:
        """down_proj(swiglu(gate_proj(x), up_proj(x)))."""
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class FusedRotary(nn.Module):
    """transformers' `apply_rotary_pos_emb` for one attention module's wrapper slot, on `lorakit.fused`'s op.

    Shaped as the hub-kernels wrapper it replaces (a stateless module declaring the same layer name and a
    `forward(*args, **kwargs)`), because transformers re-runs `kernels.kernelize` over these slots whenever a
    model loaded with hub kernels (`from_pretrained`'s default) switches between train and eval; where a hub
    kernel for the device is installed it takes the slot over, as it would on the unfused model.
    """

    kernel_layer_name = _ROPE

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """(q·cos + rotate_half(q)·sin, k·cos + rotate_half(k)·sin): apply_rotary_pos_emb's arguments."""
        # no use of self: under torch.compile the kernels hook calls this with its own wrapper as self
        q, k, cos, sin, unsqueeze_dim = _rope_args(*args, **kwargs)
        return rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def _rope_args(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Any, ...]:
    """apply_rotary_pos_emb's signature, bound."""
    return q, k, cos, sin, unsqueeze_dim


def _known(module: nn.Module, names: frozenset[str]) -> bool:
    """Whether `module` is one of transformers' own classes named in `names`."""
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("transformers.")


def _plan(model: nn.Module) -> list[tuple[str, str]]:
    """(module name, what to fuse: "norm" | "mlp" | "rope") for every block `fuse_frozen_blocks` would swap."""
    from transformers.activations import SiLUActivation  # here: lorakit imports without the hf extra

    plan = []
    for name, module in model.named_modules():
        if _known(module, RMSNORMS) and isinstance(getattr(module, "weight", None), nn.Parameter):
            plan.append((name, "norm"))
        elif _known(module, MLPS) and isinstance(getattr(module, "act_fn", None), SiLUActivation | nn.SiLU):
            plan.append((name, "mlp"))
        elif _known(module, ATTENTIONS):
            slots = module.__dict__.get("_kernel_funcs")
            if isinstance(slots, dict) and _ROPE in slots and not isinstance(slots[_ROPE], FusedRotary):
                plan.append((name, "rope"))
    return plan


def _fused(module: nn.Module, kind: str) -> nn.Module:
    """The fused replacement of `module` (a norm or an MLP), sharing its parameters and submodules."""
    if kind == "norm":
        return FusedRMSNorm(module.weight, float(module.variance_epsilon))  # type: ignore[arg-type]
    return FusedSwiGLU(module.gate_proj, module.up_proj, module.down_proj)  # type: ignore[arg-type]


def fuse_frozen_blocks(model: nn.Module) -> list[str]:
    """Swap `model`'s Llama-formula RMSNorms, SwiGLU MLPs and RoPE for fused ones, in place, per instance.

    Parameters, submodules and state-dict keys stay the same objects under the same names, so LoRA layers,
    optimisers, saved adapters and checkpoints are untouched. Idempotent (a second call swaps nothing).

    Args:
        model: a transformers model (LoRA applied or not). Unknown architectures are left alone.

    Returns:
        The names of what was swapped, in module order; a RoPE hook is named `<attention module>:rotary`.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        ...                   vocab_size=64)
        >>> fuse_frozen_blocks(LlamaForCausalLM(cfg))[:3]
        ['model.layers.0.self_attn:rotary', 'model.layers.0.mlp', 'model.layers.0.input_layernorm']
    """
    done = []
    for name, kind in _plan(model):
        module = model.get_submodule(name)
        if kind == "rope":
            module.__dict__["_kernel_funcs"][_ROPE] = FusedRotary()  # this instance's wrapper slot only
            done.append(f"{name}:rotary")
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _fused(module, kind))
        done.append(name)
    return done


def resolve_fuse(choice: str, model: nn.Module, train: TrainConfig) -> bool:
    """Whether to fuse `model`'s blocks for this run: "on", "off", or "auto".

    "auto" is on when the model has blocks to fuse and training runs on the CPU, where fused blocks were
    measured to make the training step faster (benchmarks/RESULTS-fused.md); off on other devices, where it is
    unmeasured. "on" for a model with nothing to fuse is a ValueError naming its classes.

    Examples:
        >>> from lorakit.train.config import TrainConfig
        >>> resolve_fuse("off", torch.nn.Linear(2, 2), TrainConfig())
        False
    """
    if choice == "off":
        return False
    fusable = bool(_plan(model))
    if choice == "on" and not fusable:
        seen = sorted({c for c in (type(m).__name__ for m in model.modules()) if "Norm" in c or "MLP" in c})
        raise ValueError(
            f"fuse='on': {type(model).__name__} has no block lorakit can fuse (norm/MLP classes: {seen or 'none'}; "
            f"known: {sorted(RMSNORMS | MLPS)})"
        )
    return fusable and (choice == "on" or _device(train).type == "cpu")


def _device(train: TrainConfig) -> torch.device:
    """The device the run trains on (TrainConfig.device resolved, "auto" included)."""
    return resolve_device(train.device)
