"""Cross-entropy over an output layer, chunk by chunk of tokens: the full (tokens, vocab) logits never exist.

`chunked_cross_entropy(hidden, weight, labels)` is `F.cross_entropy(F.linear(hidden, weight, bias), labels)`
(mean over the labels that are not `ignore_index`) computed on chunks of tokens whose (n, vocab) fp32 logits
stay under `CHUNK_BYTES` (or hold `MIN_CHUNK_TOKENS`). When a gradient is wanted the forward computes it too,
chunk by chunk, while each chunk's logits are at hand (softmax − one-hot, times the output layer), and keeps
only the results: the gradient of `hidden` (the size of `hidden` itself) and, only when they require grad,
those of `weight` and `bias`. The backward then just scales them by the incoming gradient (exact: the loss is
a scalar). This costs the plain path's two GEMMs (logits, and gradient of the input) and none of its (tokens,
vocab) buffers; recomputing the logits in the backward instead would cost a third GEMM.

Precision follows the plain path: the logits GEMM runs in the autocast dtype under autocast (else in the
inputs' dtype), and the softmax, logsumexp and loss are fp32 (as transformers upcasts the logits).
With no label to predict the loss is NaN and every gradient zero, as `F.cross_entropy`'s mean gives.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_BYTES = 32 * 2**20  # a chunk's fp32 logits stay under this (32 MiB) ...
# ... unless that leaves fewer tokens than this: each chunk streams the whole weight twice (logits, gradient),
# and with fewer tokens that traffic, not the arithmetic, bounds it. Measured at vocab 128256 (hidden 512,
# 1024 tokens, 1 thread, AMD EPYC): 65-token chunks ran 1.04x the plain loss's time, 256-token chunks 0.83x.
MIN_CHUNK_TOKENS = 256


def chunk_size(vocab: int) -> int:
    """Tokens per chunk: a chunk's fp32 (tokens, vocab) logits under `CHUNK_BYTES`, but `MIN_CHUNK_TOKENS` at least.

    Examples:
        >>> chunk_size(4096), chunk_size(32000), chunk_size(128256)
        (2048, 262, 256)
    """
    return max(MIN_CHUNK_TOKENS, CHUNK_BYTES // (4 * vocab))


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
) -> Tensor:
    """Mean cross-entropy of `F.linear(hidden, weight, bias)` against `labels`, without the full logits.

    Args:
        hidden: (N, d) inputs of the output layer; row i predicts `labels[i]` (a causal LM's already shifted).
        weight: (V, d) the output layer's weight (an lm_head's).
        labels: (N,) class indices; `ignore_index` rows count for nothing.
        bias: (V,) the output layer's bias, if it has one.
        ignore_index: the label that is skipped (transformers' -100).
        chunk_tokens: tokens per chunk; default `chunk_size(V)` (fp32 logits under 32 MiB, or 256 tokens).

    Returns:
        The fp32 scalar loss; NaN when every label is ignored (gradients then zero), as `F.cross_entropy`.

    Examples:
        >>> h, w, y = torch.randn(5, 4), torch.randn(7, 4), torch.tensor([1, -100, 6, 0, 2])
        >>> plain = F.cross_entropy(h @ w.T, y)
        >>> torch.allclose(chunked_cross_entropy(h, w, y, chunk_tokens=2), plain)
        True
    """
    _check(hidden, weight, labels, bias)
    n = chunk_size(weight.shape[0]) if chunk_tokens is None else chunk_tokens
    if n < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} is invalid: expected an int >= 1 or None")
    kind = hidden.device.type
    autocast = torch.is_autocast_enabled(kind)
    dtype = torch.get_autocast_dtype(kind) if autocast else torch.promote_types(hidden.dtype, weight.dtype)
    wanted = [t is not None and t.requires_grad for t in (hidden, weight, bias)]
    if torch.is_grad_enabled() and any(wanted):
        out: Tensor = _ChunkedCE.apply(hidden, weight, bias, labels, ignore_index, n, dtype)
        return out
    return _run(hidden, weight, bias, labels, ignore_index, n, dtype, [False, False, False])[0]


def _check(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None) -> None:
    """ValueError naming the shapes unless hidden (N, d), weight (V, d), labels (N,) and bias (V,) agree."""
    ok = hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1]
    ok = ok and labels.shape == (hidden.shape[0],) and not labels.is_floating_point()
    ok = ok and (bias is None or bias.shape == (weight.shape[0],))
    if not ok:
        raise ValueError(
            f"chunked_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels "
            f"{tuple(labels.shape)} {labels.dtype}, bias {None if bias is None else tuple(bias.shape)}: expected "
            "hidden (N, d), weight (V, d), integer labels (N,) and bias (V,) or None"
        )


def _run(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    ignore_index: int,
    n: int,
    dtype: torch.dtype,
    wanted: list[bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The loss, and the gradients `wanted` (hidden, weight, bias) of it, chunk by chunk of `n` tokens."""
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    valid = labels != ignore_index
    count = valid.sum()
    scale = torch.where(count > 0, 1.0 / count.clamp(min=1), 0.0)  # d loss / d token loss; 0 with nothing to learn
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    g_hidden = torch.empty_like(hidden) if wanted[0] else None
    g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wanted[1] else None
    g_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if wanted[2] else None
    for s in range(0, hidden.shape[0], n):
        h = hidden[s : s + n].to(dtype)
        logits = F.linear(h, w, b).float()  # (n, V): the only vocabulary-sized buffer, one chunk at a time
        keep = valid[s : s + n]
        target = labels[s : s + n].masked_fill(~keep, 0).unsqueeze(1)  # (n, 1)
        lse = logits.logsumexp(dim=1)  # (n,)
        total = total + ((lse - logits.gather(1, target).squeeze(1)) * keep).sum()
        if not any(wanted):
            continue
        grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
        grad.scatter_add_(1, target, -keep.to(grad.dtype).unsqueeze(1))  # − one-hot on the kept rows
        grad.mul_((keep * scale).unsqueeze(1))  # (n, V): d loss / d logits
        g = grad.to(dtype)
        if g_hidden is not None:
            g_hidden[s : s + n] = (g @ w).to(hidden.dtype)
        if g_weight is not None:
            g_weight += (g.T @ h).float()
        if g_bias is not None:
            g_bias += grad.sum(dim=0)
    return total / count, g_hidden, g_weight, g_bias


class _ChunkedCE(torch.autograd.Function):
    """The loss with its gradients computed in the forward (module docstring); the backward scales them."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        ignore_index: int,
        n: int,
        dtype: torch.dtype,
    ) -> Tensor:
        wanted = list(ctx.needs_input_grad[:3])
        loss, g_hidden, g_weight, g_bias = _run(hidden, weight, bias, labels, ignore_index, n, dtype, wanted)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(g_hidden, g_weight, g_bias)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        grads = [None if g is None else (g * grad).to(t) for g, t in zip(ctx.saved_tensors, ctx.dtypes, strict=True)]
        return (*grads, None, None, None, None)
