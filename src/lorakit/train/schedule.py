"""Learning rates and the optimizer: schedules as a pure function of the optimizer step (so resuming needs only
the step), LoRA+'s per-group scale, and the (fused) AdamW the trainer steps."""

from __future__ import annotations

import math
from typing import Any

import torch


def lr_at(step: int, total_steps: int, peak: float, kind: str = "constant", warmup_steps: int = 0) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total_steps`.

    Warm-up ramps linearly from peak/warmup_steps to peak; then "constant" stays, "linear" falls
    to 0 at the last step, "cosine" follows half a cosine to 0 (Loshchilov & Hutter, SGDR).

    Examples:
        >>> [round(lr_at(s, 10, 1.0, "linear", warmup_steps=2), 3) for s in (0, 1, 2, 9)]
        [0.5, 1.0, 1.0, 0.125]
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if kind == "constant":
        return peak
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    if kind == "linear":
        return peak * (1.0 - progress)
    if kind == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule {kind!r} is unknown: expected 'constant', 'linear' or 'cosine'")


def param_groups(params: dict[str, torch.nn.Parameter], loraplus_ratio: float | None) -> list[dict[str, Any]]:
    """AdamW groups: with LoRA+ the `lora_B` factors get lr_scale = ratio, the rest 1 (the trainer multiplies)."""
    ratio = 1.0 if loraplus_ratio is None else float(loraplus_ratio)
    b = [p for n, p in params.items() if ratio != 1.0 and "lora_B" in n.split(".")]
    rest = [p for n, p in params.items() if not (ratio != 1.0 and "lora_B" in n.split("."))]
    return [g for g in ({"params": rest, "lr_scale": 1.0}, {"params": b, "lr_scale": ratio}) if g["params"]]


def adamw(
    groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.AdamW:
    """AdamW over `groups` as one fused kernel (torch's `fused=True`) where every parameter allows it.

    LoRA trains many small tensors (two per layer): the default per-tensor loop costs ~4 ms a step for the
    56 factors of a 4-layer Llama-style model on one CPU thread, the fused kernel ~0.5 ms (RESULTS.md). Same
    update rule; the two round differently (compare with a tolerance). Fused needs floating-point parameters
    on a device with the kernel (CPU, CUDA, MPS, XPU): otherwise the default loop.
    """
    supported = ("cpu", "cuda", "mps", "xpu")
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in supported for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)
