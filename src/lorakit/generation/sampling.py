"""How one request picks its next token: greedy, or temperature, top-k and nucleus (top-p) sampling, seeded per
request. The one sampler of lorakit: `lorakit generate`, `lorakit predict` and `lorakit serve` all draw with
`sample`, so a seeded request gives the same tokens through each of them.

No accepted value can make a draw raise: a temperature below `GREEDY_BELOW` is greedy (vLLM's floor), the
scaled logits are float64 (a float32 logit divided by any temperature above the floor stays finite), top-k is
clamped to the vocabulary, and the most likely token always survives top-p, however small top_p is. What is
left (a model whose logits hold NaN or +inf) raises `SamplingError` for that row only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

GREEDY_BELOW = 1e-5  # temperatures under this are greedy, as vLLM's _SAMPLING_EPS: softmax(l / 1e-5) is argmax already
SEED_MODULUS = 2**64  # torch.Generator takes seeds in [0, 2**64); any int is reduced into that range


class SamplingError(RuntimeError):
    """One row's logits cannot be sampled (NaN, +inf, or nothing finite): that row fails, the others go on."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it ends.

    Attributes:
        max_tokens: the most new tokens (finish_reason "length" when reached).
        temperature: below `GREEDY_BELOW` (0 included) greedy (argmax); above, the logits are divided by it
            and sampled.
        top_p: nucleus sampling: sample among the most likely tokens whose probabilities add up to top_p
            (the most likely token is always kept).
        top_k: sample among the k most likely tokens; 0 (or -1, as vLLM writes it) keeps them all, and a k
            over the vocabulary's size keeps them all.
        seed: seeds the request's own `torch.Generator` (reduced modulo 2**64), so its tokens do not depend on
            the other requests in the batch; None draws a fresh random seed.
        stop: stop strings; the text is cut before the first one (finish_reason "stop").
        stop_token_ids: token ids that end the completion (e.g. EOS, a chat template's end of turn); the
            token counts as a completion token, its text is not emitted.

    Examples:
        >>> SamplingParams(max_tokens=4, stop=["\\n"]).stop
        ('\\n',)
        >>> SamplingParams(temperature=1e-45).greedy
        True
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))  # lists from JSON become tuples: the params stay hashable
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} is invalid: expected an int >= 1")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature={self.temperature!r} is invalid: expected a finite number >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} is invalid: expected a number in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k={self.top_k!r} is invalid: expected an int >= 0 (0 or -1: every token)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r} is invalid: expected an int or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={list(self.stop)!r} is invalid: expected non-empty strings")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={list(self.stop_token_ids)!r} is invalid: expected ints")

    @property
    def greedy(self) -> bool:
        """True when the request takes the most likely token at every step."""
        return self.temperature < GREEDY_BELOW


def generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request, seeded with `seed` modulo 2**64 (None: a fresh random seed)."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed % SEED_MODULUS)
    return gen


def sample(logits: Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """One token id from one row of logits (V,): argmax when greedy, else temperature, top-k, top-p, drawn with `gen`.

    The draw happens on the CPU in float64, so a seeded request gives the same tokens on any device and in any
    batch. Raises `SamplingError` when the logits cannot be sampled (NaN, +inf, or all -inf).
    """
    if params.greedy:
        return int(logits.argmax())
    x = logits.detach().to("cpu", torch.float64)  # (V,)
    top = float(x.max()) if x.numel() else float("nan")
    if bool(x.isnan().any()) or not -float("inf") < top < float("inf"):
        raise SamplingError(f"the model's logits cannot be sampled (largest {top}, NaN: {bool(x.isnan().any())})")
    x = x / params.temperature  # float64: finite for any float32 logit and any temperature >= GREEDY_BELOW
    if 0 < params.top_k < x.numel():
        kth = x.topk(params.top_k).values[-1]
        x = x.masked_fill(x < kth, -float("inf"))
    probs = torch.softmax(x, dim=-1)  # (V,)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the more likely tokens
        drop = before >= params.top_p
        drop[0] = False  # the most likely token always stays, however small top_p is
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(drop, 0))
    return int(torch.multinomial(probs, 1, generator=gen))


def sample_rows(
    logits: Tensor, params: Sequence[SamplingParams], gens: Sequence[torch.Generator]
) -> list[int | SamplingError]:
    """One token per row of logits (B, V), or that row's `SamplingError`: greedy rows in one argmax, sampled rows
    one by one. A row that fails does not stop the others."""
    greedy = logits.argmax(-1).tolist()  # (B,)
    out: list[int | SamplingError] = []
    for i, (g, p, gen) in enumerate(zip(greedy, params, gens, strict=True)):
        try:
            out.append(g if p.greedy else sample(logits[i], p, gen))
        except SamplingError as e:
            out.append(e)
        except (RuntimeError, ValueError) as e:  # torch's own refusal of a distribution: the row's failure too
            out.append(SamplingError(f"{type(e).__name__}: {e}"))
    return out
