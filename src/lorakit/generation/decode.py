"""A fixed batch of prompts decoded to its end: the loop behind `lorakit generate` and `lorakit predict`.

The prompts are prefilled left-padded in one forward (`kv.Batch`), then every row decodes one token per step,
drawn by the one sampler (`sampling.sample_rows`) with its own seeded generator, until it reaches a stop token
or its max_tokens. Each row gives what it would alone, and what the server's engine gives for the same request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .kv import Batch
from .sampling import SamplingError, SamplingParams, generator, sample_rows


def generate_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    *,
    pad_id: int,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Each prompt's new token ids (a stop token included, as the last one), row i sampled with `params[i]`.

    `on_token(i, token)` is called as each token of row i is drawn, before the next step runs: what streams a
    completion while it is generated. Raises `SamplingError` if a row's logits cannot be sampled.

    Examples:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11)).eval()
        >>> [len(r) for r in generate_ids(m, [[1, 2], [3]], [SamplingParams(max_tokens=3)] * 2, pad_id=0)]
        [3, 3]
    """
    if len(prompts) != len(params) or not prompts or any(not p for p in prompts):
        raise ValueError(f"expected as many non-empty prompts as params; got {len(prompts)} prompts, {len(params)}")
    gens = [generator(p.seed) for p in params]
    out: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # the rows of `batch`, by prompt index
    with torch.no_grad():
        logits, batch = Batch.prefill(model, prompts, pad_id)
        while True:
            tokens = sample_rows(logits, [params[i] for i in live], [gens[i] for i in live])
            keep = []
            for j, (i, t) in enumerate(zip(live, tokens, strict=True)):
                if isinstance(t, SamplingError):
                    raise t
                out[i].append(t)
                if on_token is not None:
                    on_token(i, t)
                if t not in params[i].stop_token_ids and len(out[i]) < params[i].max_tokens:
                    keep.append(j)
            if not keep:
                return out
            if len(keep) < len(live):
                live = [live[j] for j in batch.keep(keep)]  # rows that leave are filled by the last ones
            batch.last = torch.tensor([out[i][-1] for i in live], dtype=torch.long, device=batch.mask.device)
            logits = batch.step(model)
