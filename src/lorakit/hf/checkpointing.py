"""Gradient (activation) checkpointing for a LoRA-wrapped transformers model: less memory, one more forward.

Each decoder layer keeps only its input during the forward and recomputes its activations in the backward
(transformers' `GradientCheckpointingLayer`, active while the model trains with gradients on). lorakit uses
torch's non-reentrant checkpoint: it needs no input that requires grad, so the frozen embeddings stay out of
the graph. (The reentrant variant would need `model.enable_input_require_grads()`, since nothing before the
first layer trains.) LoRA dropout stays exact: each layer draws its mask inside its forward and the recompute
replays the same RNG state, so loss and gradients are those of a run without checkpointing
(tests/test_modes.py, tests/hf/test_packing.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def enable(model: PreTrainedModel) -> None:
    """Turn on non-reentrant gradient checkpointing for every layer; ValueError naming the model type if
    transformers does not support it for this architecture."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        kind = getattr(model.config, "model_type", "?")
        raise ValueError(
            f"gradient_checkpointing=True: the {kind!r} model ({type(model).__name__}) "
            "does not support gradient checkpointing in transformers; train it without"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers also makes the embeddings' output require grad, which only the reentrant variant needs;
    # undone, so the backward does not compute an input gradient for the first layer that nothing uses
    model.disable_input_require_grads()
    # a checkpointed layer cannot fill a KV cache (its forward runs twice); transformers would drop it per layer,
    # with a warning, while training
    model.config.use_cache = False
    if not active(model):
        raise RuntimeError(f"{type(model).__name__}: gradient checkpointing was enabled but no layer has it on")


def active(model: PreTrainedModel) -> bool:
    """Whether any layer of `model` checkpoints (it does so only in training mode, with gradients on)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
