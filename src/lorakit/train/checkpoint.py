"""Training checkpoints: one safetensors file, written atomically, holding only what training changes.

    param.<name>              each trainable parameter (for a LoRA model: the adapter, nothing of the base)
    optim.<index>.<key>       AdamW's per-parameter tensors (exp_avg, exp_avg_sq, step)
    rng.<group>.<name>        generator states (uint8 tensors)
    __metadata__["state"]     JSON: config, epoch, batch position, step, optimizer hyper-parameters, meters, ...

No pickle anywhere: a checkpoint is read with the same strict safetensors reader as adapters. One file
means a reader (a resumed run) sees either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import LoraFileError
from ..files import safetensors as safetensors_io

FORMAT = "lorakit-train-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """What a checkpoint holds, as loaded."""

    params: dict[str, Tensor]
    optimizer: dict  # a torch optimizer state_dict
    rng: dict[str, dict[str, Tensor]]  # group -> name -> state tensor
    state: dict  # the JSON part


def write_checkpoint(
    path: str | Path,
    params: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    rng: dict[str, dict[str, Tensor]],
    state: dict,
) -> Path:
    """Write a checkpoint atomically; `state` must be JSON-ready."""
    path = Path(path)
    tensors: dict[str, Tensor] = {f"param.{n}": p.detach() for n, p in params.items()}
    sd = optimizer.state_dict()
    extra: dict[str, dict] = {}
    for index, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                extra.setdefault(str(index), {})[key] = value
    for group, states in rng.items():
        for name, t in states.items():
            tensors[f"rng.{group}.{name}"] = t
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "state": json.dumps({**state, "optimizer": {"param_groups": sd["param_groups"], "extra": extra}}),
    }
    safetensors_io.write(path, tensors, meta)
    return path


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check a `write_checkpoint` file; a foreign or malformed file is a LoraFileError naming it."""
    path = Path(path)
    tensors, meta = safetensors_io.read(path)
    if meta.get("format") != FORMAT:
        raise LoraFileError(f"{path}: not a lorakit training checkpoint (metadata format={meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise LoraFileError(f"{path}: checkpoint version {meta.get('version')!r}; this lorakit reads {VERSION}")
    try:
        state = json.loads(meta["state"])
        opt = state.pop("optimizer")
        groups, extra = opt["param_groups"], opt["extra"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise LoraFileError(f"{path}: the checkpoint's state metadata is malformed ({e})") from None
    params: dict[str, Tensor] = {}
    per_param: dict[int, dict] = {int(i): dict(v) for i, v in extra.items()}
    rng: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "param":
            params[rest] = t
        elif kind == "optim":
            index, _, name = rest.partition(".")
            per_param.setdefault(int(index), {})[name] = t
        elif kind == "rng":
            group, _, name = rest.partition(".")
            rng.setdefault(group, {})[name] = t
        else:
            raise LoraFileError(f"{path}: unexpected tensor {key!r} in a training checkpoint")
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return Checkpoint(params, {"state": per_param, "param_groups": groups}, rng, state)


def load_params(where: str, model: torch.nn.Module, params: dict[str, Tensor]) -> None:
    """Copy checkpointed trainable parameters into `model`; every name and shape checked first."""
    live = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(live) - set(params)), sorted(set(params) - set(live))
    if missing or unexpected:
        raise LoraFileError(
            f"{where}: checkpoint does not fit the model's trainable parameters; "
            f"missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    for name, p in live.items():
        if tuple(params[name].shape) != tuple(p.shape):
            raise LoraFileError(
                f"{where}: {name} has shape {tuple(params[name].shape)}; the model expects {tuple(p.shape)}"
            )
    with torch.no_grad():
        for name, p in live.items():
            p.copy_(params[name].to(p.dtype))
