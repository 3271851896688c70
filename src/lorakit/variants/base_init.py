"""Inits that take A and B from the base weight (PEFT's formulas), and the export that undoes them.

    PiSSA (Meng et al. 2024): W = U S Vᵀ;  A = √(S_r/s) V_rᵀ,  B = U_r √(S_r/s)   (s·B A = U_r S_r V_rᵀ)
    OLoRA (Büyükakyüz 2024):  W = Q R;     A = R_r (first r rows),  B = Q_r (first r columns)

Either way the base becomes the residual W − s·B₀A₀, so the wrapped layer computes W at init. An
adapter trained from there is saved for the ORIGINAL W: its update is `s·(B A − B₀A₀) = s·[B, −B₀][A; A₀]`,
a rank-2r LoRA with the same scaling (PEFT's path_initial_model_for_weight_conversion). `init_from_base` is
what linear LoRA layers call for `LoraConfig(init="pissa" | "olora")`, through `layers.BASE_INITS`
(`lorakit.variants.register` puts it there).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .. import bases
from ..adapter_set import BaseInit
from ..config import BASE_CHANGING_INITS, LoraConfig
from ..files import provenance
from ..layers import LoraLayer


def base_init(
    weight: Tensor, rank: int, scaling: float, init: str, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(A, B, residual) for init "pissa" or "olora" from a (d_out, d_in) weight; A, B in `dtype`, residual in W's.

    The residual is formed from A and B as rounded to `dtype`, so base + s·B A reproduces W as closely as the
    weight's dtype allows.
    """
    W = weight.detach().float()  # (d_out, d_in)
    if rank > min(W.shape):
        raise ValueError(f"init={init!r} needs rank <= min(d_out, d_in) = {min(W.shape)}, got rank {rank}")
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
        root = (S[:rank] / scaling).sqrt()  # (r,)
        A, B = root[:, None] * Vh[:rank], U[:, :rank] * root  # (r, d_in), (d_out, r)
    elif init == "olora":
        Q, R = torch.linalg.qr(W)  # (d_out, k), (k, d_in)
        A, B = R[:rank], Q[:, :rank]
    else:
        raise ValueError(
            f"init {init!r} does not take its factors from the base weight; "
            f"those that do: {', '.join(map(repr, BASE_CHANGING_INITS))}"
        )
    A, B = A.to(dtype).contiguous(), B.to(dtype).contiguous()
    residual = torch.addmm(W, B.float(), A.float(), alpha=-scaling)  # W − s·B A
    return A, B, residual.to(weight.dtype)


class InitialFactors(BaseInit):
    """The factors A₀ (r, d_in), B₀ (d_out, r) adapter `adapter` started from, whose product left the base."""

    A0: Tensor  # buffers: they follow the layer's .to() and state_dict
    B0: Tensor

    def __init__(self, adapter: str, A0: Tensor, B0: Tensor) -> None:
        super().__init__()
        self.adapter = adapter
        self.register_buffer("A0", A0)
        self.register_buffer("B0", B0)

    def export(self, A: Tensor, B: Tensor, config: LoraConfig) -> tuple[Tensor, Tensor, LoraConfig]:
        """(A, B, config) trained from A₀, B₀ as a rank-2r LoRA for the original W, with the same scaling."""
        alpha = config.alpha * (2**0.5 if config.use_rslora else 2.0)  # same scaling at rank 2r
        exported = replace(config, rank=2 * config.rank, alpha=alpha, init="kaiming")
        assert abs(exported.scaling - config.scaling) <= 1e-12 * config.scaling
        A2 = torch.cat([A.detach(), self.A0.to(A.dtype)])  # (2r, d_in)
        B2 = torch.cat([B.detach(), -self.B0.to(B.dtype)], dim=1)  # (d_out, 2r)
        return A2, B2, exported


def init_from_base(layer: LoraLayer, config: LoraConfig) -> InitialFactors:
    """Fill the layer's active A, B from its base weight and leave the residual in the base."""
    if bases.is_quantized(layer.base):
        raise TypeError(f"init={config.init!r} needs a plain base weight to change; quantise after the init")
    lora_A, lora_B, _ = layer.active_factors()  # just bound by LoraLayer.__init__, as adapter_name
    assert layer.adapter_name is not None, "bound with the factors"
    weight = bases.dense_weight(layer.base, layer.fan_in_fan_out)  # (d_out, d_in): a view of base.weight
    source = provenance.weight_record(bases.weight(layer.base))  # the original W, before the residual replaces it
    A, B, residual = base_init(weight, config.rank, config.scaling, config.init, lora_A.dtype)
    with torch.no_grad():
        lora_A.copy_(A)
        lora_B.copy_(B)
        weight.copy_(residual)
    init = InitialFactors(layer.adapter_name, A.clone(), B.clone())
    init.source_fingerprint = source
    return init
