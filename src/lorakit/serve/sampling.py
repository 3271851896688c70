"""How one request picks its next token: greedy, or temperature and nucleus (top-p) sampling, seeded per request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it ends.

    Attributes:
        max_tokens: the most new tokens (finish_reason "length" when reached).
        temperature: 0 is greedy (argmax); above 0 the logits are divided by it and sampled.
        top_p: nucleus sampling: sample among the most likely tokens whose probabilities add up to top_p.
        seed: seeds the request's own `torch.Generator`, so its tokens do not depend on the other requests
            in the batch; None draws a fresh random seed.
        stop: stop strings; the text is cut before the first one (finish_reason "stop").
        stop_token_ids: token ids that end the completion (e.g. EOS, a chat template's end of turn); the
            token counts as a completion token, its text is not emitted.

    Examples:
        >>> SamplingParams(max_tokens=4, stop=["\\n"]).stop
        ('\\n',)
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))  # lists from JSON become tuples: the params stay hashable
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} is invalid: expected an int >= 1")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature={self.temperature!r} is invalid: expected a number >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} is invalid: expected a number in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r} is invalid: expected an int or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={list(self.stop)!r} is invalid: expected non-empty strings")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={list(self.stop_token_ids)!r} is invalid: expected ints")

    @property
    def greedy(self) -> bool:
        """True when the request takes the most likely token at every step."""
        return self.temperature == 0


def generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request, seeded with `seed` (None: a fresh random seed)."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample(logits: Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """One token id from one row of logits (V,): argmax when greedy, else temperature + top-p, drawn with `gen`.

    The draw happens on the CPU in float32, so a seeded request gives the same tokens on any device.
    """
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.detach().float().cpu() / params.temperature, dim=-1)  # (V,)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the more likely tokens
        sorted_probs[before >= params.top_p] = 0  # the most likely token always stays (before = 0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen))


def sample_rows(logits: Tensor, params: Sequence[SamplingParams], gens: Sequence[torch.Generator]) -> list[int]:
    """One token per row of logits (B, V): greedy rows in one argmax, sampled rows one by one."""
    greedy = logits.argmax(-1).tolist()  # (B,)
    return [
        g if p.greedy else sample(logits[i], p, gen)
        for i, (g, p, gen) in enumerate(zip(greedy, params, gens, strict=True))
    ]
