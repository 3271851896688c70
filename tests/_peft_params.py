"""PEFT's `target_parameters` (ParamWrapper) as an oracle: build it, and copy factors between it and lorakit.

PEFT >= 0.19 lays a 3-D parameter's factors out flat: lora_A.weight (E·r, d_in), row e·r + j is A_e[j];
lora_B.weight (d_out, r·E), column j·E + e is B_e[:, j]. lorakit holds A (E, r, d_in), B (E, d_out, r).
Import after `sys.path.insert(0, tests_dir)`.
"""

from __future__ import annotations

import copy
import warnings

import peft
import torch
from torch import nn

import lorakit as lk
from lorakit.param_layers import param_paths


def peft_params_model(base: nn.Module, rules: list[str], rank: int = 2, alpha: float = 4.0) -> nn.Module:
    """PEFT's model with LoRA on the parameters `rules` select (no module targeted), on a copy of `base`."""
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=[], target_parameters=rules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), cfg)


def peft_wrappers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's ParamWrappers by the path of the parameter each adapts (`model.layers.0.mlp.experts.gate_up_proj`)."""
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "ParamWrapper":
            owner = name.removeprefix("base_model.model.").replace(".base_layer", "")
            out[f"{owner}.{module.parameter_name}"] = module
    return out


def to_lorakit(A_flat: torch.Tensor, B_flat: torch.Tensor, experts: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's flat (lora_A, lora_B) -> lorakit's per-expert factors (unchanged for a 2-D parameter)."""
    if experts is None:
        return A_flat, B_flat
    r = A_flat.shape[0] // experts
    return A_flat.reshape(experts, r, -1), B_flat.reshape(B_flat.shape[0], r, experts).permute(2, 0, 1)


def from_lorakit(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lorakit's factors -> PEFT's flat (lora_A, lora_B)."""
    if A.dim() == 2:
        return A, B
    E, r, d_in = A.shape
    return A.reshape(E * r, d_in), B.permute(1, 2, 0).reshape(B.shape[1], r * E)


def copy_into_peft(model: nn.Module, peft_model: nn.Module) -> None:
    """Copy every lorakit LoraParam's active factors into the PEFT wrapper of the same parameter."""
    ours = param_paths(lk.lora_layers(model))
    theirs = peft_wrappers(peft_model)
    assert sorted(ours) == sorted(theirs), (sorted(ours), sorted(theirs))
    with torch.no_grad():
        for path, layer in ours.items():
            A, B = from_lorakit(layer.lora_A, layer.lora_B)
            theirs[path].lora_A["default"].weight.copy_(A)
            theirs[path].lora_B["default"].weight.copy_(B)


def peft_grads(model: nn.Module, peft_model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's factor gradients mapped to lorakit's layout, by parameter path (those that have gradients)."""
    out = {}
    for path, w in peft_wrappers(peft_model).items():
        if w.lora_A["default"].weight.grad is None:
            continue
        experts = w.num_experts if w.get_param().dim() == 3 else None
        out[path] = to_lorakit(w.lora_A["default"].weight.grad, w.lora_B["default"].weight.grad, experts)
    return out
