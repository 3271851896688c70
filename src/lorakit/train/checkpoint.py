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
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import LoraFileError
from ..files import safetensors as safetensors_io
from .config import TrainConfig

FORMAT = "lorakit-train-checkpoint"
VERSION = 1


@dataclass
class RunState:
    """Where a run is: the trainer's counters and last losses, saved in the checkpoint's JSON."""

    epoch: int = 1  # 1-based, the epoch in progress
    batch: int = 0  # batches done in `epoch` (0: at its start)
    step: int = 0  # optimizer steps done
    elapsed_s: float = 0.0
    best_valid_loss: float | None = None
    rows: int = 0  # metrics.jsonl rows written
    train_loss: float = math.nan
    valid_loss: float | None = None
    grad_norm_sum: float = 0.0  # since the last logged step
    grad_norms: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunState:
        """The run state out of a checkpoint's JSON (which holds more keys)."""
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass
class Checkpoint:
    """What a checkpoint holds, as loaded."""

    params: dict[str, Tensor]
    optimizer: dict[str, Any]  # a torch optimizer state_dict
    rng: dict[str, dict[str, Tensor]]  # group -> name -> state tensor
    state: dict[str, Any]  # the JSON part


def write_checkpoint(
    path: str | Path,
    params: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer,
    rng: dict[str, dict[str, Tensor]],
    state: dict[str, Any],
) -> Path:
    """Write a checkpoint atomically; `state` must be JSON-ready."""
    path = Path(path)
    tensors: dict[str, Tensor] = {f"param.{n}": p.detach() for n, p in params.items()}
    sd = optimizer.state_dict()
    extra: dict[str, dict[str, Any]] = {}
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
    per_param: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in extra.items()}
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


def resume_from(
    path: Path, config: TrainConfig, world_size: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[Checkpoint, RunState]:
    """Read the checkpoint at `path`, check it was made by the same TrainConfig on as many processes, and
    restore the model's trainable parameters and the optimizer from it; returns it and its run state."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from (run without resume first)")
    ckpt = read_checkpoint(path)
    saved = {**TrainConfig().to_dict(), **ckpt.state["config"]}  # a key newer than the checkpoint: its default
    now = config.to_dict()
    if saved != now:
        diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        raise ValueError(f"{path}: the checkpoint was made with a different TrainConfig; (saved, now): {diff}")
    saved_world = ckpt.state.get("world_size", 1)
    if saved_world != world_size:
        raise ValueError(
            f"{path}: the checkpoint was made by {saved_world} process(es) and this run has "
            f"{world_size}; resume with the same number of processes"
        )
    load_params(str(path), model, ckpt.params)
    optimizer.load_state_dict(ckpt.optimizer)
    return ckpt, RunState.from_dict(ckpt.state)
