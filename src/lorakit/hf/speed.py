"""How a finetune job makes the frozen model cheaper, and what each choice resolved to for this model and run.

Three settings, each "auto" or forced: the loss (`chunked` cross-entropy that never holds the full logits, or
the model's `plain` loss: causal_loss.py), fused elementwise blocks for eager training (`fuse`: fuse.py) and
regionally compiled decoder blocks (`compile`: lorakit.train.compile). "auto" picks what was measured to pay
for this model and run (each rule is documented beside it); a forced choice the model cannot take is a
ValueError naming the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..train.compile import COMPILE_PAD_MULTIPLE, compile_unsupported
from ..train.device import resolve_device
from . import causal_loss
from .fuse import fuse_frozen_blocks, resolve_fuse

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..train.batch import Objective
    from ..train.config import TrainConfig

LOSSES = ("auto", "chunked", "plain")
SWITCHES = ("auto", "on", "off")


@dataclass(frozen=True)
class SpeedConfig:
    """The job's speed settings, before they are resolved against the model.

    Args:
        loss: "auto", "chunked" (causal-lm: cross-entropy over chunks of tokens, never the full logits) or "plain".
        fuse: "auto", "on" or "off": fused RMSNorm / SwiGLU (and RoPE where the model allows) in eager training.
        compile: "auto", "on" or "off": torch.compile each repeated decoder block (one compiled code for all).

    Examples:
        >>> SpeedConfig(loss="chunked").compile
        'auto'
    """

    loss: str = "auto"
    fuse: str = "auto"
    compile: str = "auto"

    def __post_init__(self) -> None:
        for name, allowed in (("loss", LOSSES), ("fuse", SWITCHES), ("compile", SWITCHES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is invalid: expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Resolved:
    """What the speed settings became for this model and run: the loss, whether blocks are fused and compiled,
    and the padding multiple of the training batches (compiled blocks see few distinct sequence lengths)."""

    loss: str = "plain"  # or "chunked"
    fuse: bool = False
    compile: bool = False
    pad_multiple: int = 1

    def items(self) -> dict[str, str]:
        """The setup line's `key=value` pairs."""
        on = {True: "on", False: "off"}
        return {"loss": self.loss, "fuse": on[self.fuse], "compile": on[self.compile]}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (the run report's "speed")."""
        return asdict(self)


def resolve(
    config: SpeedConfig, model: PreTrainedModel, *, task: str, train: TrainConfig, checkpointing: bool = False
) -> Resolved:
    """`config` resolved for `model` (loaded, LoRA applied, not yet fused or compiled), the job's task, its
    training settings (device, steps) and whether it will checkpoint activations (compiling is then refused)."""
    loss = causal_loss.resolve_loss(config.loss, model, task)
    fuse = resolve_fuse(config.fuse, model, train)
    on = _compile_choice(config.compile, model, train, checkpointing)
    return Resolved(loss=loss, fuse=fuse, compile=on, pad_multiple=COMPILE_PAD_MULTIPLE if on else 1)


# "auto" stays eager: compiled blocks were not shown to pay on top of the fused ones that "auto" turns on. Alone,
# they ran a step in 0.91x eager's time after 14 s of compiling (benchmarks/RESULTS-compiled.md, AMD EPYC, quiet);
# end to end, `finetune --compile on` (fused blocks and the chunked loss on as well) gave 0.95x the tokens/s of
# the same run eager (benchmarks/RESULTS-e2e.md). CUDA: not measured here. "on" compiles wherever it can.


def _compile_choice(choice: str, model: PreTrainedModel, train: TrainConfig, checkpointing: bool) -> bool:
    """Whether to compile the blocks: "on" unless unsupported (a ValueError naming why); "auto" and "off" never
    (the measurements above)."""
    if choice != "on":
        return False
    device = resolve_device(train.device)
    reason = compile_unsupported(model, device)
    if checkpointing and reason is None:
        reason = "gradient checkpointing is on: torch.utils.checkpoint runs its blocks with torch.compile disabled"
    if reason is not None:
        raise ValueError(f"compile='on' cannot be used: {reason}")
    return True


def apply(resolved: Resolved, model: PreTrainedModel) -> None:
    """Make `model` what `resolved` says before training starts (fused blocks swapped in, per instance)."""
    if resolved.fuse:
        fuse_frozen_blocks(model)


def objective(resolved: Resolved, model: PreTrainedModel) -> Objective | None:
    """The training objective the loss setting asks for: None for the model's own (plain) loss."""
    return causal_loss.CausalLMChunkedLoss(model) if resolved.loss == "chunked" else None
