"""LoRA on one parameter of any module (`target_parameters`): `LoraParam`, PEFT's ParamWrapper semantics.

A 2-D parameter P (d_out, d_in) gets A (r, d_in), B (d_out, r) as a Linear does; a 3-D one (E, d1, d2), fused
experts, gets a rank-r pair per expert, A (E, r, d_in), B (E, d_out, r), with (d_in, d_out) = (d2, d1), or
(d1, d2) where the owner says `is_transposed` (PEFT >= 0.19's convention). Expert e's delta is s·B_e A_e, laid
into P[e] as (d_out, d_in), or as its transpose for a transposed owner.

Several parameters of one module nest as PEFT nests them: the first registered is the innermost LoraParam, each
next one wraps the previous (`base`); `owner` is the real module under them all. The outermost computes the
forward for the whole chain: a transformers experts owner through `ops_experts` (routed rows only), an
nn.Linear's weight exactly as `LoraLinear`, any other owner through `torch.func.functional_call` with P + delta.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import ops
from .adapter_set import DEFAULT_ADAPTER, check_adapter_name
from .config import BASE_CHANGING_INITS, LoraConfig
from .errors import LoraStateError
from .layers import LoraLayer
from .ops_experts import ExpertFactors, ExpertStore, experts_forward, routing_args
from .ops_experts_mixed import MixedExpertFactors, token_slots
from .param_targets import ParamTargets, find_parameters, is_experts_module

__all__ = ["LoraParam", "nested_key", "param_factor_shapes", "param_paths", "select_params", "with_param_lora"]


def param_factor_shapes(owner: nn.Module, param_name: str, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (lora_A, lora_B) for LoRA of `rank` on `owner.<param_name>`: (r, d_in), (d_out, r) for a 2-D
    parameter, (E, r, d_in), (E, d_out, r) for a 3-D one (d_in, d_out as PEFT >= 0.19 reads them)."""
    p = _param(owner, param_name)
    if p.dim() == 2:
        d_out, d_in = p.shape
        return (rank, d_in), (d_out, rank)
    E, d1, d2 = p.shape
    d_in, d_out = (d1, d2) if getattr(owner, "is_transposed", False) else (d2, d1)
    return (E, rank, d_in), (E, d_out, rank)


def _param(owner: nn.Module, name: str) -> Tensor:
    p = owner._parameters.get(name)
    if p is None:
        raise TypeError(f"{type(owner).__name__} has no parameter {name!r}")
    if not p.is_floating_point() or p.dim() not in (2, 3):
        raise TypeError(
            f"{type(owner).__name__}.{name} is a {p.dim()}-D {p.dtype} tensor {tuple(p.shape)}: LoRA adapts 2-D and "
            "3-D floating-point parameters only"
        )
    return p


class LoraParam(LoraLayer):
    """LoRA on `owner.<param_name>`: `base` is the owner, or the LoraParam of another of its parameters (nested).

    Examples:
        >>> layer = LoraParam(nn.Linear(4, 3), "weight", LoraConfig(rank=2))
        >>> layer.lora_A.shape, layer.lora_B.shape
        (torch.Size([2, 4]), torch.Size([3, 2]))
    """

    peft_layout = "param"
    param_name: str

    def __init__(
        self, base: nn.Module, param_name: str, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER
    ) -> None:
        nn.Module.__init__(self)
        if config.rank_pattern or config.alpha_pattern:
            config = config.for_module("")
        owner = base.owner if isinstance(base, LoraParam) else base
        self.check_param(owner, param_name, config)
        chain = base.chain() if isinstance(base, LoraParam) else []
        if any(layer.param_name == param_name for layer in chain):
            raise LoraStateError(f"{type(owner).__name__}.{param_name} already has LoRA")
        self.param_name = param_name
        self.base = base
        # the parameter stored quantised (QLoRA: lorakit.variants.quant_experts), the owner's then a meta tensor
        self.quantized: nn.Module | None = None
        self.init_state(check_adapter_name(adapter_name), config)
        _param(owner, param_name).requires_grad_(False)

    @classmethod
    def check_param(cls, owner: nn.Module, param_name: str, config: LoraConfig) -> None:
        """Raise where LoRA with `config` cannot adapt `owner.<param_name>` (what PEFT's ParamWrapper refuses too)."""
        if config.use_dora:
            raise ValueError("DoRA (use_dora=True) is not supported on target_parameters (PEFT refuses it too)")
        if config.init in BASE_CHANGING_INITS:
            raise TypeError(f"init={config.init!r} is supported on linear layers only, not on target_parameters")
        p = _param(owner, param_name)
        linear = isinstance(owner, nn.Linear) and param_name == "weight"
        expert_weight = is_experts_module(owner) and p.dim() == 3  # an expert bias (E, d_out) has no input
        if config.dropout > 0.0 and not (linear or expert_weight):
            raise ValueError(
                f"lora dropout on {type(owner).__name__}.{param_name}: dropout needs the parameter's input, which "
                "only nn.Linear weights and transformers experts weights expose; use dropout=0"
            )
        param_factor_shapes(owner, param_name, config.rank)

    # -- the chain of nested LoraParams on one owner ------------------------------------------------
    @property
    def owner(self) -> nn.Module:
        """The real module under every nested LoraParam."""
        base = self.base
        while isinstance(base, LoraParam):
            base = base.base
        return base

    @property
    def param(self) -> Tensor:
        """The adapted parameter, as the owner holds it."""
        return _param(self.owner, self.param_name)

    @property
    def num_experts(self) -> int | None:
        """E for a 3-D parameter, None for a 2-D one."""
        p = self.param
        return p.shape[0] if p.dim() == 3 else None

    @property
    def is_transposed(self) -> bool:
        """Whether a 3-D parameter is stored (E, d_in, d_out) (the owner's `is_transposed`)."""
        return bool(getattr(self.owner, "is_transposed", False)) and self.param.dim() == 3

    def chain(self) -> list[LoraParam]:
        """This LoraParam and those it wraps, outermost first."""
        out: list[LoraParam] = [self]
        while isinstance(out[-1].base, LoraParam):
            out.append(out[-1].base)
        return out

    # -- LoraLayer's hooks --------------------------------------------------------------------------
    @classmethod
    def factor_shapes(cls, base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise TypeError("LoraParam's factor shapes depend on the parameter: use layer.shapes(rank)")

    def shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (lora_A, lora_B) for LoRA of `rank` on this parameter."""
        return param_factor_shapes(self.owner, self.param_name, rank)

    def stack_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.shapes(1)

    def stack_lead(self) -> int:
        return 1 if self.param.dim() == 3 else 0  # per-expert pairs (E, r, d_in), (E, d_out, r)

    def merge_target(self) -> Tensor:
        return self.param

    def new_adapter(self, config: LoraConfig) -> dict[str, nn.Parameter]:
        """Fresh factors: A as PEFT draws its (E·r, d_in) lora_A (kaiming over d_in, or N(0, 1/r)), B zero."""
        a_shape, b_shape = self.shapes(config.rank)
        p = self.param
        A = nn.Parameter(torch.empty(a_shape, dtype=p.dtype, device=p.device))
        B = nn.Parameter(torch.empty(b_shape, dtype=p.dtype, device=p.device))
        with torch.no_grad():
            flat = A.view(-1, a_shape[-1])  # (E·r, d_in): fan_in d_in, as PEFT's nn.Linear lora_A
            if config.init == "gaussian":
                torch.nn.init.normal_(A, std=1.0 / config.rank)
            else:
                ops.init_factors_(flat, B, config.init)
            B.zero_()
        return {"lora_A": A, "lora_B": B}

    def weight_delta(self) -> Tensor:
        """scaling · B @ A in fp32, laid out like the parameter (zero with no active adapter)."""
        if self.adapter_name is None:
            return torch.zeros(self.param.shape, device=self.param.device)
        A, B, config = self.active_factors()
        if A.dim() == 2:
            return ops.delta_weight(A, B, config.scaling)
        delta = (B.float() * config.scaling) @ A.float()  # (E, d_out, d_in)
        return delta.transpose(1, 2) if self.is_transposed else delta

    def merged_weight(self, weight: Tensor) -> Tensor:
        if self.adapter_name is None:
            return super().merged_weight(weight)
        A, B, config = self.active_factors()
        if self.is_transposed:  # P[e] (d_in, d_out) + s·A_eᵀ B_eᵀ
            return ops.merged_low_rank(weight, A.transpose(1, 2), B.transpose(1, 2), config.scaling, self.param_name)
        return ops.merged_low_rank(weight, B, A, config.scaling, self.param_name)

    def merge(self) -> nn.Module:
        """A plain copy of the owner with this LoRA's delta, and those of the LoraParams it wraps, merged in."""
        plain = copy.deepcopy(self.owner)
        with torch.no_grad():
            for layer in self.chain():
                if layer.quantized is not None:  # the owner holds a meta tensor: the dequantised weight instead
                    dense = layer.quantized.dequantize()  # type: ignore[operator]
                    plain._parameters[layer.param_name] = nn.Parameter(dense, requires_grad=False)
            for layer in self.chain():
                if layer.adapter_name is not None and not layer.merged:
                    p = _param(plain, layer.param_name)
                    p.copy_(layer.merged_weight(p))
        return plain.requires_grad_(False)

    def merge_(self) -> LoraParam:
        """Merge in place (`LoraLayer.merge_`); refused for a quantised parameter, as for a quantised linear base."""
        if self.quantized is not None:
            raise LoraStateError("a quantised expert weight cannot be merged in place; merge() exports it dequantised")
        super().merge_()
        return self

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.mixed is not None:
            return self._mixed(args, kwargs)
        owner = self.owner
        active = [layer for layer in self.chain() if layer.computes_lora()]
        if not active and not any(layer.quantized is not None for layer in self.chain()):
            return owner(*args, **kwargs)
        if is_experts_module(owner):
            return self._experts(owner, active, args, kwargs)
        if len(active) == 1 and isinstance(owner, nn.Linear) and active[0].param_name == "weight" and not kwargs:
            A, B, config = active[0].active_factors()
            s, p = config.scaling, config.dropout
            return ops.lora_linear(args[0], owner.weight, owner.bias, A, B, s, p, self.training)
        with torch.autocast(_device_type(owner), enabled=False):  # P + delta in P's dtype, as it is stored
            new = {layer.param_name: layer.adapted() for layer in active}
        return torch.func.functional_call(owner, new, args, kwargs)

    def computes_lora(self) -> bool:
        """Whether this parameter's LoRA term is computed now (an active adapter, not merged, not disabled)."""
        return self.adapter_name is not None and not self.merged and not self.disabled

    def adapted(self) -> Tensor:
        """P + scaling · B A in P's layout and dtype, differentiable in A and B (the generic forward's parameter)."""
        A, B, config = self.active_factors()
        P, s = self.param, config.scaling
        if A.dim() == 2:
            return torch.addmm(P, B, A, alpha=s)
        if self.is_transposed:
            return torch.baddbmm(P, A.transpose(1, 2), B.transpose(1, 2), alpha=s)
        return torch.baddbmm(P, B, A, alpha=s)

    def _experts(self, owner: nn.Module, active: list[LoraParam], args: tuple, kwargs: dict) -> Tensor:
        factors: dict[str, ExpertFactors] = {}
        weights = self._stored_weights()
        for layer in active:
            A, B, config = layer.active_factors()
            if A.dim() == 3 and layer.param_name in ("gate_up_proj", "up_proj", "down_proj"):
                factors[layer.param_name] = ExpertFactors(A, B, config.scaling, config.dropout)
            else:  # a bias (E, d_out) or another parameter: small, so added whole
                weights[layer.param_name] = layer.adapted()
        hidden, index, routing = routing_args(owner, args, kwargs)
        return experts_forward(owner, hidden, index, routing, factors, weights, self.training)

    def _mixed(self, args: tuple, kwargs: dict) -> Tensor:
        """A mixed batch through an experts owner: every routed token with its row's slot's factors
        (`ops_experts_mixed`); slots come from each LoraParam's stacks (an AdapterTable's)."""
        owner, slots = self.owner, self.mixed
        assert slots is not None, "called inside a mixed batch"
        chain = self.chain()
        if not is_experts_module(owner) or any(layer.param.dim() != 3 for layer in chain):
            raise self._mixed_error()
        hidden, index, routing = routing_args(owner, args, kwargs)
        weights = self.slot_stacks.index.weights if self.slot_stacks is not None else None  # (rows, K) or None
        try:
            tokens = token_slots(slots.to(hidden.device), hidden.shape[0])
            token_weights = None if weights is None else token_slots(weights.to(hidden.device), hidden.shape[0])
        except ValueError as e:
            raise LoraStateError(f"mixed_batch: {e}") from None
        factors: dict[str, ExpertFactors | MixedExpertFactors] = {}
        for layer in chain:
            stacks = layer.slot_stacks
            assert stacks is not None, "an AdapterTable gives every LoRA layer of the model its stacks"
            A, B, _ = stacks.state(layer, slots)  # the stacks as they are: each term weighted at use
            factors[layer.param_name] = MixedExpertFactors(A, B, tokens, token_weights)
        return experts_forward(owner, hidden, index, routing, factors, self._stored_weights())

    def _stored_weights(self) -> dict[str, Tensor | ExpertStore]:
        """The chain's quantised expert weights (QLoRA), which the routed forward decodes per used expert."""
        stored: dict[str, Tensor | ExpertStore] = {}
        for layer in self.chain():
            if isinstance(store := layer.quantized, ExpertStore):
                stored[layer.param_name] = store
        return stored

    def _mixed_error(self) -> LoraStateError:
        return LoraStateError(
            f"mixed-adapter batches run LoRA on the 3-D weights of transformers experts modules, not on "
            f"{type(self.owner).__name__}.{self.param_name}; use set_adapter"
        )

    def extra_repr(self) -> str:
        return f"param_name={self.param_name!r}, " + super().extra_repr()


def _device_type(module: nn.Module) -> str:
    p = next(module.parameters(), None)
    return "cpu" if p is None else p.device.type


def with_param_lora(
    owner: nn.Module, param_names: list[str], config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER, path: str = ""
) -> LoraParam:
    """Wrap `owner`'s parameters `param_names` with LoRA, nested in the owner's registration order (the first
    registered innermost, as PEFT nests them); the outermost LoraParam, to put in the owner's place. `path`, the
    owner's module name, resolves the config's rank/alpha patterns on each `path.param` (PEFT's keys).

    Examples:
        >>> layer = with_param_lora(nn.Linear(4, 3), ["weight"], LoraConfig(rank=2))
        >>> type(layer).__name__, layer.param_name
        ('LoraParam', 'weight')
    """
    order = list(owner._parameters)
    names = sorted(dict.fromkeys(param_names), key=order.index)
    if not names:
        raise ValueError("with_param_lora needs at least one parameter name")
    layer: nn.Module = owner
    for name in names:
        layer = LoraParam(layer, name, config.for_module(f"{path}.{name}" if path else name), adapter_name)
    assert isinstance(layer, LoraParam)
    return layer


def select_params(
    model: nn.Module,
    config: LoraConfig,
    targets: str | Sequence[str] | ParamTargets | None,
    target_parameters: Sequence[str],
    exclude: Sequence[str],
    modules: Iterable[tuple[str, nn.Module]],
) -> dict[str, list[str]]:
    """{module name: [parameter names]} that `target_parameters` and a ParamTargets `targets` select among
    `modules` (name, module), each checked for `config` (`LoraParam.check_param`); apply_lora's selection."""
    modules = list(modules)
    if isinstance(target_parameters, str):
        target_parameters = [target_parameters]
    found: list[tuple[str, str]] = []
    if target_parameters:
        found += find_parameters(model, list(target_parameters), modules, exclude)
    if isinstance(targets, ParamTargets):
        found += find_parameters(model, targets, modules, exclude)
    owners: dict[str, list[str]] = {}
    for module, pname in found:
        if pname not in owners.setdefault(module, []):
            owners[module].append(pname)
    for module, pnames in owners.items():
        for pname in pnames:
            cfg = config.for_module(f"{module}.{pname}")
            try:
                LoraParam.check_param(model.get_submodule(module), pname, cfg)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{module}.{pname}: {e}") from None
    return owners


def param_paths(layers: dict[str, LoraLayer]) -> dict[str, LoraLayer]:
    """`layers` (from `lora_layers`) keyed as a user names them: a LoraParam by its parameter's path
    (`mlp.experts.gate_up_proj`), nested ones included, every other layer by its module name."""
    owner: dict[str, str] = {}
    out: dict[str, LoraLayer] = {}
    for name, layer in layers.items():
        parent = name.removesuffix(".base")
        owner[name] = owner.get(parent, name) if parent != name and isinstance(layers.get(parent), LoraParam) else name
        out[f"{owner[name]}.{layer.param_name}" if isinstance(layer, LoraParam) else name] = layer
    return out


def nested_key(layer: LoraLayer, key: str) -> bool:
    """Whether parameter `key` of `layer` belongs to a LoraParam it wraps (counted on that one's row)."""
    return isinstance(layer, LoraParam) and isinstance(layer.base, LoraParam) and key.startswith("base.")
