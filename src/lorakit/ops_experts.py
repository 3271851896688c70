"""LoRA on fused expert weights: the routed forward of a transformers experts module with low-rank updates.

    y_e(x) = x W_e + s · (drop(x) A_eᵀ) B_eᵀ      A: (E, r, d_in)   B: (E, d_out, r)   per expert e

transformers v5 experts modules (`use_experts_implementation`) hold `gate_up_proj` (or `up_proj`) and `down_proj`
as 3-D parameters, (E, d_out, d_in) and computed as F.linear(x, W[e]), or (E, d_in, d_out) and x @ W[e] when
`is_transposed`. `experts_forward` computes what their grouped forward does, rows sorted by expert, and adds each
adapted weight's low-rank term on the rows routed to each expert only: two rank-r GEMMs per expert and
projection, never the (E, d_in, d_out) delta. Plain autograd ops throughout (so double backward, checkpointing,
inference_mode and torch.compile work as for any op); dropout draws one mask per call and adapted weight over its
routed input rows (sorted by expert), from torch's default generator, as the linear LoRA does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LoraStateError
from .ops_experts_mixed import MixedExpertFactors, mixed_expert_term
from .ops_linear import dropout_keep

__all__ = ["ExpertFactors", "ExpertStore", "experts_forward", "routing_args"]


@runtime_checkable
class ExpertStore(Protocol):
    """An expert weight stored in another form (QLoRA: `lorakit.variants.quant_experts.QuantExperts`), passed in
    `weights` in place of the parameter: the routed forward asks it for each used expert's product."""

    shape: tuple[int, ...]  # the parameter's (E, d1, d2)

    def expert_linear(self, e: int, x: Tensor) -> Tensor:
        """x (n, d_in) through expert e's frozen weight: (n, d_out)."""
        ...


@dataclass(frozen=True)
class ExpertFactors:
    """One adapted expert weight's active adapter: A (E, r, d_in), B (E, d_out, r), its scaling and dropout."""

    A: Tensor
    B: Tensor
    scaling: float
    dropout: float = 0.0


def routing_args(owner: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) from a call of the experts module, whatever its
    forward names them (gpt-oss: router_indices, routing_weights)."""
    if len(args) == 3 and not kwargs:
        return args[0], args[1], args[2]
    bound = inspect.signature(owner.forward).bind(*args, **kwargs)
    values = list(bound.arguments.values())
    if len(values) != 3:
        raise TypeError(
            f"{type(owner).__name__} was called with {len(values)} arguments; expected hidden, index, weights"
        )
    return values[0], values[1], values[2]


def experts_forward(
    owner: nn.Module,
    hidden: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    factors: Mapping[str, ExpertFactors | MixedExpertFactors],
    weights: Mapping[str, Tensor | ExpertStore] | None = None,
    training: bool = False,
) -> Tensor:
    """The experts module's forward with LoRA on the weights named in `factors` (on the rows routed to each expert).

    Args:
        owner: a transformers experts module (`has_gate`, `has_bias`, `is_transposed`, `_apply_gate`, `act_fn`,
            `has_post_expert_norm`, parameters gate_up_proj/up_proj, down_proj and their `_bias`).
        hidden, top_k_index, top_k_weights: its call's arguments, (T, H), (T, k), (T, k).
        factors: the adapted weights' factors by parameter name.
        weights: parameters to use in place of the owner's (a bias with its own delta), by name.
        training: draw the dropout masks (with each factor's `dropout` > 0).
    """
    if getattr(owner, "_is_expert_parallel", False):
        raise LoraStateError(f"LoRA on {type(owner).__name__} does not support expert parallelism")
    if torch.is_autocast_enabled(hidden.device.type):  # run in the autocast dtype, once, as F.linear would
        dt = torch.get_autocast_dtype(hidden.device.type)
        with torch.autocast(hidden.device.type, enabled=False):
            cast = {n: replace(f, A=f.A.to(dt), B=f.B.to(dt)) for n, f in factors.items()}
            params = {n: p.to(dt) if isinstance(p, Tensor) else p for n, p in _params(owner, weights).items()}
            out = experts_forward(owner, hidden.to(dt), top_k_index, top_k_weights, cast, params, training)
        return out.to(hidden.dtype)
    params = _params(owner, weights)
    T, k = top_k_index.shape
    ids = top_k_index.reshape(-1)
    sorted_ids, perm = torch.sort(ids, stable=True)
    up = "gate_up_proj" if owner.has_gate else "up_proj"
    counts = torch.bincount(sorted_ids, minlength=params[up].shape[0]).tolist()  # one sync, as transformers' offsets
    tokens = perm // k  # (S,): the token of each sorted row
    x = hidden[tokens]  # (S, H): each token once per expert it is routed to, grouped by expert
    h = _project(owner, params, up, x, sorted_ids, counts, tokens, factors.get(up), training)
    h = _activation(owner)(h)
    y = _project(owner, params, "down_proj", h, sorted_ids, counts, tokens, factors.get("down_proj"), training)
    if owner.has_post_expert_norm:
        norm = owner.post_expert_norm
        assert isinstance(norm, nn.Module), "has_post_expert_norm: the module has its norm"
        y = norm(y)
    y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)  # (S, H)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.shape[0], device=perm.device)
    return y[inv].view(T, k, -1).sum(dim=1).to(hidden.dtype)  # transformers' deterministic per-token sum


def _activation(owner: nn.Module) -> Callable[[Tensor], Tensor]:
    """The owner's step between its projections: `_apply_gate` (gated experts) or `act_fn`."""
    fn = owner._apply_gate if owner.has_gate else owner.act_fn
    assert callable(fn), f"{type(owner).__name__} has its gate / activation"
    return fn


def _params(owner: nn.Module, weights: Mapping[str, Tensor | ExpertStore] | None) -> dict[str, Tensor | ExpertStore]:
    names = ["gate_up_proj" if owner.has_gate else "up_proj", "down_proj"]
    if owner.has_bias:
        names += [f"{n}_bias" for n in names]
    out: dict[str, Tensor | ExpertStore] = {n: getattr(owner, n) for n in names}
    out.update(weights or {})
    return out


def _project(
    owner: nn.Module,
    params: Mapping[str, Tensor | ExpertStore],
    name: str,
    x: Tensor,
    ids: Tensor,
    counts: list[int],
    tokens: Tensor,
    factors: ExpertFactors | MixedExpertFactors | None,
    training: bool,
) -> Tensor:
    """x (S, d_in) sorted by expert -> (S, d_out): each expert's rows through its weight, plus its LoRA term (in a
    mixed batch, each row's own: `ops_experts_mixed`)."""
    f = factors if isinstance(factors, ExpertFactors) else None
    W = params[name]
    transposed = bool(owner.is_transposed)
    xd = x
    if f is not None and f.dropout > 0.0 and training:
        keep, drop_scale = dropout_keep(tuple(x.shape), f.dropout, x.device)
        xd = x * keep.to(x.dtype) * drop_scale
    store = None if isinstance(W, Tensor) else W  # a quantised weight: each used expert decoded at use
    Ws = W.unbind(0) if isinstance(W, Tensor) else ()  # views; unbind's backward stacks per-expert grads once
    As, Bs = (f.A.unbind(0), f.B.unbind(0)) if f is not None else ((), ())
    # split, not x[start:end] per expert: a slice's backward writes into a zero-filled (S, d_in) gradient for
    # every expert, while split's backward concatenates the pieces once
    xs = x.split(counts)
    xds = xs if xd is x else xd.split(counts)
    outs = []
    for e, n in enumerate(counts):
        if n == 0:
            continue
        if store is not None:
            ye = store.expert_linear(e, xs[e])  # (n, d_out)
        else:
            ye = xs[e] @ Ws[e] if transposed else F.linear(xs[e], Ws[e])  # (n, d_out)
        if f is not None:
            h = xds[e] @ As[e].t()  # (n, r)
            ye = torch.addmm(ye, h, Bs[e].t(), alpha=f.scaling)
        outs.append(ye)
    y = torch.cat(outs) if outs else x.new_zeros(0, _d_out(W, transposed))
    if isinstance(factors, MixedExpertFactors):
        y = y + mixed_expert_term(x, ids, tokens, factors)
    bias = params.get(f"{name}_bias")
    if isinstance(bias, Tensor):
        y = y + bias[ids]
    return y


def _d_out(W: Tensor | ExpertStore, transposed: bool) -> int:
    return W.shape[2] if transposed else W.shape[1]
