"""GRPO's rollouts: completions sampled by lorakit's continuous-batching engine from the adapter being trained.

`EngineSampler` is the `Sampler` a GRPO objective calls once per step with the batch's prompts: every prompt is
submitted `n` times (request k seeded `seed + k`), the engine decodes them all together with a KV cache, and the
new token ids come back prompt-major. Each call runs an engine of its own over the model's live parameters (no
copy of the weights is kept between calls, so an optimizer step in between is always seen), on the engine's
thread under `torch.no_grad()` (no autograd graph, no inference-mode tensor left behind), and gives the model back
in the train/eval mode and with the active adapter it had. A request samples exactly as `lorakit generate` with the
same `SamplingParams` and seed does (the one sampler of `lorakit.generation`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..adapters import active_adapter, list_adapters
from ..errors import LoraStateError
from ..generation.sampling import SamplingParams
from ..hf import chat
from ..hf.generation import stop_ids
from ..serve.engine import Engine

DRAIN_SECONDS = 60.0  # every request has ended when the engine stops; this only bounds a broken run


def rollout_stop_ids(model: nn.Module, tokenizer: Any) -> tuple[int, ...]:
    """The ids that end a completion, as TRL's GRPOTrainer stops: the tokenizer's EOS, the model's generation config's
    EOS id(s), and the chat template's end-of-turn token where it is another one (e.g. <|im_end|>)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = ([] if eos is None else [int(eos)]) + list(stop_ids(model, tokenizer))
    if getattr(tokenizer, "chat_template", None):
        ids += chat.end_of_turn_ids(tokenizer)
    return tuple(dict.fromkeys(ids))


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (the engine runs no-grad forwards: no gradient sync)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


class EngineSampler:
    """Samples `n` completions per prompt from the live weights of a LoRA adapter with the serving engine.

    Args:
        model: a causal LM with LoRA applied (or its DDP wrapper: the module inside runs).
        tokenizer: its tokenizer (EOS and the chat template's end-of-turn end a completion).
        max_new_tokens: the most new tokens of a completion (TRL's max_completion_length).
        temperature, top_p, top_k: how tokens are drawn (`SamplingParams`; temperature 0 is greedy).
        max_batch: the most sequences decoded together; more wait and join as others finish.
        adapter: the adapter that samples; None: the one active when the sampler is called.
        stop_token_ids: the ids that end a completion; None: `rollout_stop_ids(model, tokenizer)`.

    Examples:
        >>> import lorakit as lk
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = lk.apply_lora(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11)),
        ...                   lk.LoraConfig(rank=2), ["c_attn"])
        >>> class Tok:
        ...     eos_token_id, pad_token_id = 10, 0
        ...     def decode(self, ids, skip_special_tokens=True): return " ".join(map(str, ids))
        >>> sample = EngineSampler(m, Tok(), max_new_tokens=3, temperature=1.0, top_p=1.0, top_k=0)
        >>> out = sample([[1, 2], [3]], n=2, seed=0)
        >>> len(out), all(1 <= len(c) <= 3 for c in out), m.training
        (4, True, True)
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        max_batch: int = 64,
        adapter: str | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} is invalid: expected an int >= 1")
        self.model = _unwrapped(model)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.adapter = adapter
        if adapter is not None and adapter not in list_adapters(self.model):
            raise LoraStateError(f"adapter={adapter!r} is not loaded; the model has {list_adapters(self.model)}")
        stops = rollout_stop_ids(self.model, tokenizer) if stop_token_ids is None else tuple(stop_token_ids)
        self.params = SamplingParams(  # validates the values, naming a bad one
            max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop_token_ids=stops
        )

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The ids that end a completion (the last token of a completion that stopped)."""
        return self.params.stop_token_ids

    def __call__(self, prompts: list[list[int]], n: int, seed: int) -> list[list[int]]:
        """`n` completions of each prompt, prompt-major (prompt i's j-th at i*n + j, seeded `seed + i*n + j`): each the
        new token ids, the stop token included when one was drawn.

        Raises ValueError for an empty prompt or one too long for the model's context with max_new_tokens, and
        RuntimeError naming the request if the engine failed one (its logits could not be sampled).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} is invalid: expected an int >= 1 completions per prompt")
        adapter = self._adapter()
        modes = [(m, m.training) for m in self.model.modules()]
        engine = Engine(self.model, self.tokenizer, max_batch=self.max_batch, max_queue=len(prompts) * n)
        try:
            # every request is queued before the loop starts, so the batches it runs do not depend on timing
            handles = [
                engine.submit(p, adapter, dataclasses.replace(self.params, seed=seed + i * n + j))
                for i, p in enumerate(prompts)
                for j in range(n)
            ]
            engine.start()
            results = [h.result() for h in handles]
        finally:
            engine.stop(DRAIN_SECONDS if engine.failure is None else 0.0)
            for m, training in modes:
                m.training = training
        for k, r in enumerate(results):
            if r.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"rollout {k} (prompt {k // n}, completion {k % n}) failed: {r.error}")
        return [r.token_ids for r in results]

    def _adapter(self) -> str:
        """The adapter this call samples from: the one given, else the active one."""
        adapter = self.adapter if self.adapter is not None else active_adapter(self.model)
        if adapter is None:
            raise LoraStateError(
                "no LoRA adapter is active: rollouts sample from the adapter being trained "
                f"(the model has {list_adapters(self.model)}; activate one or pass adapter=)"
            )
        return adapter
