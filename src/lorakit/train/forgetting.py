"""A forgetting monitor: how far the adapted model's next-token distributions have moved from the base's on
reference text (text the fine-tune should not change, e.g. general prose).

    KL_ref = Σ_tokens KL(p_adapted ‖ p_base) / #tokens,   KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)

over every non-padding position (attention mask 1) of the reference batches; the base is the same model
inside `lorakit.adapters.disable_adapters` (LoRA layers run their base, modules_to_save their original
module), so no second copy of the model is held. It is 0 for a freshly applied LoRA (B = 0) and grows as
the adapter moves the model's predictions. With init="pissa"/"olora" the disabled model is the residual
base (W − s·B₀A₀), not the original, so the value starts above 0 there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..adapters import disable_adapters

Batch = Mapping[str, Tensor] | Tensor


class ReferenceKL:
    """The mean per-token KL(adapted ‖ base) over `loader`'s reference batches; a Trainer(reference=...) monitor.

    Args:
        loader: batches of token ids: `{"input_ids": (B, T), "attention_mask": (B, T)}` mappings (other keys,
            such as labels, are ignored) or bare (B, T) id tensors (every position counts). Any iterable works;
            `reference_loader` builds one from a token stream.

    Examples:
        >>> import lorakit as lk
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> _ = torch.manual_seed(0)
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
        >>> model = lk.apply_lora(model, lk.LoraConfig(rank=2), ["c_attn"])
        >>> monitor = ReferenceKL(reference_loader(list(range(40)), chunk=8, batch_size=2, pad_id=0))
        >>> monitor.measure(model, torch.device("cpu"))  # B = 0: the adapted model is the base
        0.0
    """

    name = "kl_ref"

    def __init__(self, loader: Iterable[Batch]) -> None:
        self.loader = loader

    def measure(self, model: nn.Module, device: torch.device, *, bf16: bool = False) -> float:
        """KL_ref of `model` now, in eval mode without gradients; its training mode and adapters are restored."""
        was_training = model.training
        model.eval()
        total, tokens = 0.0, 0
        try:
            with torch.no_grad():
                for batch in self.loader:
                    inputs = _inputs(batch, device)
                    mask = inputs["attention_mask"].bool()  # (B, T)
                    log_p = _log_probs(model, inputs, device, bf16)  # (B, T, V) adapted
                    with disable_adapters(model):
                        log_q = _log_probs(model, inputs, device, bf16)  # (B, T, V) base
                    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T)
                    total += float(kl[mask].sum())
                    tokens += int(mask.sum())
        finally:
            model.train(was_training)
        if not tokens:
            raise ValueError("the reference loader yielded no tokens (every attention mask is 0, or it is empty)")
        return max(total / tokens, 0.0)  # fp32 rounding can leave -1e-9 where the models agree


def _inputs(batch: Batch, device: torch.device) -> dict[str, Tensor]:
    """input_ids and attention_mask of a reference batch, on `device`."""
    if isinstance(batch, Tensor):
        ids, mask = batch, None
    elif isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        raise TypeError(
            "a reference batch must be a (B, T) tensor of token ids or a mapping with 'input_ids' "
            f"(and 'attention_mask'); got {type(batch).__name__}"
        )
    if ids.dim() != 2:
        raise ValueError(f"reference input_ids must be (batch, tokens); got shape {tuple(ids.shape)}")
    mask = torch.ones_like(ids) if mask is None else mask
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _log_probs(model: nn.Module, inputs: dict[str, Tensor], device: torch.device, bf16: bool) -> Tensor:
    """Next-token log-probabilities (B, T, V) in fp32."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out: Any = model(**inputs)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise TypeError(f"ReferenceKL needs a model returning (B, T, vocab) logits; got {type(out).__name__}")
    return torch.log_softmax(logits.float(), dim=-1)


def reference_loader(ids: Sequence[int], chunk: int, batch_size: int, pad_id: int) -> DataLoader[Any]:
    """A loader of `{"input_ids", "attention_mask"}` batches: `ids` cut into chunks of `chunk` tokens, the
    last one padded with `pad_id` (masked out); in order, so every evaluation reads the same tokens.

    Examples:
        >>> batch = next(iter(reference_loader([5, 6, 7, 8, 9], chunk=3, batch_size=2, pad_id=0)))
        >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
        ([[5, 6, 7], [8, 9, 0]], [[1, 1, 1], [1, 1, 0]])
    """
    if chunk < 1 or batch_size < 1:
        raise ValueError(f"chunk={chunk} and batch_size={batch_size} must both be >= 1")
    if not ids:
        raise ValueError("the reference text has no tokens")
    pieces = [list(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    rows = [
        {
            "input_ids": torch.tensor(p + [pad_id] * (chunk - len(p))),
            "attention_mask": torch.tensor([1] * len(p) + [0] * (chunk - len(p))),
        }
        for p in pieces
    ]
    return DataLoader(rows, batch_size=batch_size)  # type: ignore[arg-type]  # a list is a map-style dataset
