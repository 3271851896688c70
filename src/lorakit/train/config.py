"""TrainConfig: every knob of a training run, frozen and validated, written as the run's config.json."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a run. Only trainable parameters reach the optimizer (AdamW).

    Args:
        epochs: passes over the training data (int >= 1); `max_steps` overrides it.
        max_steps: stop after this many optimizer steps (None: `epochs` decides). It overrides `epochs`, as
            transformers' max_steps does: the data is read again as often as needed, the schedule's total is
            `max_steps`, and the last (partial) epoch ends with the usual evaluation and checkpoint.
        lr: peak learning rate.
        weight_decay: AdamW's decoupled weight decay.
        betas: AdamW's (beta1, beta2).
        schedule: "constant", "linear" (to 0 at the last step) or "cosine" (to 0), after `warmup_steps`.
        warmup_steps: optimizer steps of linear warm-up from lr/warmup_steps to lr.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        grad_accum: micro-batches per optimizer step; the step uses the mean of their gradients (a shorter
            last group of an epoch is averaged over the batches it holds).
        precision: "fp32", or "bf16" (autocast; an error on a device without bf16 support).
        device: "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:N" or "mps".
        seed: seeds torch, random and numpy at the start of a fresh run.
        log_every: optimizer steps between step rows in metrics.jsonl and plain log lines.
        checkpoint_every: optimizer steps between checkpoints (0: at the end of each epoch only).
        eval_every: optimizer steps between evaluations on the valid loader (and the reference KL, if the
            Trainer has one); 0 or None: at the end of each epoch only. Epoch ends always evaluate, and the
            best adapter is the lowest valid loss over all evaluations.
        fsdp: under torchrun, shard the frozen weights with FSDP2 instead of replicating the model with
            DDP (see distributed.py); one process trains the same either way.
        loraplus_ratio: LoRA+ (Hayou et al. 2024): every `lora_B` trains with learning rate ratio × lr
            (the paper suggests ~16); None or 1.0 for one learning rate.
        compile: torch.compile each repeated block of the model (regional compilation: lorakit.train.compile)
            before the run starts; dropout masks, checkpointing and resume behave as in eager mode.
        offload_activations: keep the tensors the forward saves for backward in pinned CPU memory instead of
            GPU memory (`torch.autograd.graph.save_on_cpu`), copied back during backward: less GPU memory for
            long sequences, at the cost of host<->device copies. CUDA only: on a CPU device the activations
            already live in CPU memory, so the Trainer refuses it there.

    Examples:
        >>> TrainConfig(epochs=2, lr=1e-3, schedule="cosine", warmup_steps=10).schedule
        'cosine'
    """

    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    grad_accum: int = 1
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    fsdp: bool = False
    loraplus_ratio: float | None = None
    max_steps: int | None = None
    eval_every: int | None = 0
    compile: bool = False
    offload_activations: bool = False

    def __post_init__(self) -> None:
        _positive_int("epochs", self.epochs)
        _positive_int("grad_accum", self.grad_accum)
        _positive_int("log_every", self.log_every)
        for name in ("warmup_steps", "checkpoint_every", "seed"):
            _int(name, getattr(self, name), minimum=0)
        if self.max_steps is not None:
            _positive_int("max_steps", self.max_steps)
        if self.eval_every is not None:
            _int("eval_every", self.eval_every, minimum=0)
        object.__setattr__(self, "eval_every", self.eval_every or 0)  # None and 0 say the same: one spelling
        for name in ("fsdp", "compile", "offload_activations"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: expected True or False")
        if self.loraplus_ratio is not None:
            _finite("loraplus_ratio", self.loraplus_ratio, minimum=0.0, strict=True)
        _finite("lr", self.lr, minimum=0.0, strict=True)
        _finite("weight_decay", self.weight_decay, minimum=0.0)
        if self.max_grad_norm is not None:
            _finite("max_grad_norm", self.max_grad_norm, minimum=0.0, strict=True)
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"TrainConfig.betas={self.betas!r} is invalid: expected two floats in [0, 1)")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule={self.schedule!r} is invalid: expected one of {SCHEDULES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision={self.precision!r} is invalid: expected one of {PRECISIONS}")
        base = self.device.split(":")[0] if isinstance(self.device, str) else None
        if base not in DEVICES or (":" in self.device and (base != "cuda" or not self.device[5:].isdigit())):
            raise ValueError(f"TrainConfig.device={self.device!r} is invalid: expected one of {DEVICES} or 'cuda:N'")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The inverse of `to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {k: tuple(v) if k == "betas" else v for k, v in d.items()}
        return cls(**values)


def _int(name: str, value: object, minimum: int) -> None:
    """ValueError unless `value` is an int (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"TrainConfig.{name}={value!r} is invalid: expected an int >= {minimum}")


def _positive_int(name: str, value: object) -> None:
    """ValueError unless `value` is an int >= 1."""
    _int(name, value, 1)


def _finite(name: str, value: object, minimum: float, strict: bool = False) -> None:
    """ValueError unless `value` is a finite number >= minimum (> minimum if `strict`)."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not math.isfinite(number) or number < minimum or (strict and number == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"TrainConfig.{name}={value!r} is invalid: expected a finite number {bound}")
