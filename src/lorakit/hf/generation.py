"""Text generation with a local causal LM: greedy or seeded sampling (`lorakit generate`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def generate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompt: str,
    *,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> str:
    """The completion of `prompt`: greedy when temperature is 0, else sampled (seeded)."""
    from transformers import GenerationMixin

    if not isinstance(model, GenerationMixin):
        raise TypeError(f"{type(model).__name__} cannot generate text: expected a causal-lm model")
    model.eval()
    enc = tok(prompt, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert isinstance(text, str)  # one sequence of ids decodes to one string
    return text
