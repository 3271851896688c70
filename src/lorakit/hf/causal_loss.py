"""A causal LM's training loss without its full logits: the decoder, then chunked cross-entropy over the lm_head.

`CausalLMChunkedLoss(model)` is a training objective (`lorakit.train.batch.Objective`) that gives what
`model(**batch).loss` gives (the mean cross-entropy over the labels shifted by one, -100 skipped), to 1e-5 with
the same LoRA gradients, but runs only the decoder and sends to the lm_head just the positions whose next label
is trained: padding and masked prompt tokens never reach it, and the (tokens, vocab) logits never exist
(`lorakit.train.chunked_ce`). Packed rows keep their position_ids, so the decoder sees what the model's own
forward would give it.

`chunked_loss_supported(model)` says why a model cannot take it (None when it can): its forward must be exactly
`lm_head(decoder(...))` followed by the plain causal-LM loss, so the lm_head must be a plain `nn.Linear` (not
LoRA-wrapped, not a trained copy) and the head must not scale, soft-cap or add a router's auxiliary loss.
`resolve_loss` turns finetune's `loss` setting ("auto", "chunked", "plain") into the loss a run uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..train import batch as batches
from ..train.batch import IGNORE_INDEX, BatchOut
from ..train.chunked_ce import chunked_cross_entropy

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# "auto" takes the chunked loss from this vocabulary size up: the smallest measured, where it already pays.
# benchmarks/RESULTS-chunked-ce.md (AMD EPYC, 1 thread, hidden 512, 1024 tokens, 2-layer Llama, loaded machine):
# the chunked step took 0.92x / 0.88x / 0.87x the plain step's time at vocab 4096 / 32000 / 128256, and the
# steps' peak memory 0.97x / 0.51x / 0.31x; below 4096 it was not measured, so auto keeps the plain loss there.
CHUNKED_LOSS_MIN_VOCAB = 4096
# model types whose *ForCausalLM forward is `lm_head(model(...).last_hidden_state)` and then transformers'
# ForCausalLMLoss (read in their modeling code); their config-driven variations are checked one by one below
PROVEN_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma", "gemma2", "gemma3_text", "phi3")
BATCH_KEYS = frozenset({"input_ids", "attention_mask", "position_ids", "labels", "use_cache"})  # what it reads


def chunked_loss_supported(model: nn.Module) -> str | None:
    """None when `model` can train with the chunked loss, else the reason it cannot (one sentence).

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                   vocab_size=64)
        >>> chunked_loss_supported(LlamaForCausalLM(cfg)) is None
        True
        >>> chunked_loss_supported(nn.Linear(2, 2))
        'Linear is not a transformers causal LM with an lm_head'
    """
    config = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    if config is None or head is None or not hasattr(model, "get_decoder"):
        return f"{type(model).__name__} is not a transformers causal LM with an lm_head"
    kind = getattr(config, "model_type", "?")
    if kind not in PROVEN_TYPES:
        return f"model type {kind!r} is not one whose head the chunked loss is proven on ({', '.join(PROVEN_TYPES)})"
    if type(head) is not nn.Linear:
        return f"its lm_head is a {type(head).__name__}, not a plain nn.Linear (LoRA or a trained copy on it)"
    if getattr(config, "final_logit_softcapping", None):
        return f"its logits are soft-capped (final_logit_softcapping={config.final_logit_softcapping})"
    if getattr(config, "logit_scale", None) not in (None, 1, 1.0) or getattr(config, "logits_scaling", 1) != 1:
        return "its logits are scaled (logit_scale)"
    if getattr(config, "output_router_logits", False):
        return "it adds its router's auxiliary loss (output_router_logits=True)"
    decoder: Any = getattr(model, "get_decoder", None)
    if decoder() is model:
        return f"{type(model).__name__} has no separate decoder (get_decoder)"
    return None


class CausalLMChunkedLoss:
    """`model(**batch).loss` as a training objective that never holds the full logits (module docstring).

    Counts the batch as the plain path does (`samples`: predicted tokens; `units`: attention-mask ones, or
    every position of a packed batch) and gives no outputs for batch metrics (perplexity comes from the loss).
    When `net` is not `model` itself (a DDP wrapper, which must run for its ranks to synchronise) or is sharded
    in place by FSDP2 (its weights are gathered in its forward), or the batch carries inputs it does not read,
    it runs the plain `net(**batch)` instead.

    Args:
        model: a causal LM that `chunked_loss_supported` accepts (ValueError with the reason otherwise).
        chunk_tokens: tokens per chunk of the cross-entropy (default: `lorakit.train.chunked_ce.chunk_size`).

    Examples:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                   vocab_size=64)
        >>> model, ids = LlamaForCausalLM(cfg), torch.tensor([[1, 5, 9, 3]])
        >>> out = CausalLMChunkedLoss(model)(model, {"input_ids": ids, "labels": ids})
        >>> torch.allclose(out.loss, model(input_ids=ids, labels=ids).loss), out.samples, out.units
        (True, 3, 4)
    """

    def __init__(self, model: PreTrainedModel, chunk_tokens: int | None = None) -> None:
        reason = chunked_loss_supported(model)
        if reason is not None:
            raise ValueError(f"loss='chunked' cannot train this model: {reason}")
        self.model, self.chunk_tokens = model, chunk_tokens

    def __call__(self, net: nn.Module, batch: Any) -> BatchOut:
        """The batch's mean next-token loss and its sizes, as `lorakit.train.batch` counts a causal LM's."""
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        plain = net is not self.model or _sharded(net) or set(batch) - BATCH_KEYS
        if plain or not isinstance(labels, Tensor) or labels.dim() != 2:
            return batches._mapping(net, batch, None)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = self.model.get_decoder()(**inputs).last_hidden_state  # (B, T, d): what the lm_head would read
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): position t predicts token t + 1
        keep = shifted != IGNORE_INDEX
        head: Any = self.model.lm_head
        loss = chunked_cross_entropy(
            hidden[keep], head.weight, shifted[keep], bias=head.bias, chunk_tokens=self.chunk_tokens
        )
        n = int(keep.sum())
        tokens = batches.real_tokens(batch)  # counted as the plain path counts them
        return BatchOut(loss.float(), None, labels, n, tokens or n, "tokens" if tokens else "samples")


def _sharded(net: nn.Module) -> bool:
    """Whether `net` is sharded in place by FSDP2: its lm_head weight is gathered only inside its own forward."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)


def resolve_loss(choice: str, model: nn.Module, task: str) -> str:
    """The loss a finetune run trains with, "chunked" or "plain", from its `loss` setting.

    "auto" is chunked for task causal-lm when the model supports it and its vocabulary holds at least
    `CHUNKED_LOSS_MIN_VOCAB` tokens; "chunked" on a model or task that cannot take it is a ValueError naming
    the reason; "plain" is the model's own loss.

    Examples:
        >>> resolve_loss("auto", nn.Linear(2, 2), "seq-cls")
        'plain'
    """
    if choice == "plain":
        return "plain"
    reason = chunked_loss_supported(model) if task == "causal-lm" else f"task {task!r} has its own loss"
    if choice == "chunked":
        if reason is not None:
            raise ValueError(f"loss='chunked' cannot train this model: {reason}; use loss='plain' or 'auto'")
        return "chunked"
    if choice != "auto":
        raise ValueError(f"loss={choice!r} is invalid: expected one of auto, chunked, plain")
    head: Any = getattr(model, "lm_head", None)
    return "chunked" if reason is None and head.weight.shape[0] >= CHUNKED_LOSS_MIN_VOCAB else "plain"
