"""Text generation with a local causal LM: greedy or seeded sampling (`lorakit generate`, `lorakit chat`), through
the one sampler (`lorakit.generation`), so a seeded prompt gives the tokens `lorakit predict` and `lorakit serve`
give it; a transformers streamer receives the tokens as they are drawn."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..generation.decode import generate_ids
from ..generation.sampling import SamplingParams

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from transformers.generation.streamers import BaseStreamer


def stop_ids(model: nn.Module, tok: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The ids that end a completion: the model's generation config's EOS (one or several), else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    if eos is None:
        return ()
    return tuple(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))


def check_causal(model: nn.Module) -> None:
    """TypeError unless `model` generates text (a transformers causal LM)."""
    from transformers import GenerationMixin

    if not isinstance(model, GenerationMixin):
        raise TypeError(f"{type(model).__name__} cannot generate text: expected a causal-lm model")


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
    templated: bool = False,
    stop_token_ids: Sequence[int] = (),
    streamer: BaseStreamer | None = None,
) -> str:
    """The completion of `prompt`: greedy when temperature is 0, else sampled with its own seeded generator.

    `templated`: the prompt is a rendered chat template, which writes any BOS itself, so it is encoded without
    the tokenizer's special tokens. `stop_token_ids` end the completion besides the EOS (e.g. a template's end of
    turn). `streamer` (e.g. transformers' `TextStreamer`) gets each new token as it is drawn, then `end()`.
    """
    import torch

    check_causal(model)
    stops = stop_ids(model, tok)
    params = SamplingParams(
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop_token_ids=stops + tuple(int(i) for i in stop_token_ids if i not in stops),
    )
    model.eval()
    ids = [int(i) for i in tok(prompt, add_special_tokens=not templated)["input_ids"]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    put = None if streamer is None else (lambda _row, t: streamer.put(torch.tensor([t])))
    new = generate_ids(model, [ids], [params], pad_id=pad, on_token=put)[0]
    if streamer is not None:
        streamer.end()
    text = tok.decode(new, skip_special_tokens=True)
    assert isinstance(text, str)  # one sequence of ids decodes to one string
    return text
