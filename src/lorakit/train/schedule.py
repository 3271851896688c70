"""Learning-rate schedules as a pure function of the optimizer step, so resuming needs only the step."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, peak: float, kind: str = "constant", warmup_steps: int = 0) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total_steps`.

    Warm-up ramps linearly from peak/warmup_steps to peak; then "constant" stays, "linear" falls
    to 0 at the last step, "cosine" follows half a cosine to 0 (Loshchilov & Hutter, SGDR).

    Example:
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
