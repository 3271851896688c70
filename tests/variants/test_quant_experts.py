"""QLoRA on mixture-of-experts weights: NF4 (and int8) expert storage under LoRA, on tiny transformers MoE models.

The oracle is the same LoRA model computing with the dequantised weights as plain parameters: outputs and factor
gradients agree to 1e-5, only routed experts are decoded, LoRA trains on top, and the stored experts are ~0.14× fp32.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit import bases
from lorakit.param_layers import LoraParam
from lorakit.variants.quant import quantize_base
from lorakit.variants.quant_experts import QuantExperts, expert_layers

pytest.importorskip("torchao")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _moe_models import tiny_gpt_oss, tiny_qwen3_moe  # noqa: E402

FAMILIES = {"qwen3_moe": tiny_qwen3_moe, "gpt_oss": tiny_gpt_oss}
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


def adapted(family: str):
    """The family's tiny model with LoRA (r=4) on q_proj and every expert weight, B random so it counts."""
    model = lk.apply_lora(
        FAMILIES[family](), lk.LoraConfig(rank=4, alpha=8), ["q_proj"], target_parameters=["all-experts"]
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request):
    """(the NF4 QLoRA model, the same LoRA model holding the dequantised experts as plain parameters)."""
    lora = adapted(request.param)
    qlora = quantize_base(copy.deepcopy(lora), "nf4")
    reference = copy.deepcopy(lora)
    ref_layers = lk.lora_layers(reference)
    with torch.no_grad():
        for name, layer in lk.lora_layers(qlora).items():
            if isinstance(layer, LoraParam) and layer.quantized is not None:
                ref_layers[name].param.copy_(layer.quantized.dequantize())
            elif bases.is_quantized(layer.base):  # the attention's q_proj
                ref_layers[name].base.weight.copy_(layer.base.dequantize())
    return qlora, reference


def test_every_expert_weight_is_stored_quantised_and_the_dense_one_released(pair):
    qlora, _ = pair
    layers = expert_layers(qlora)
    assert len(layers) == 4  # 2 layers × (gate_up_proj, down_proj)
    for layer in layers.values():
        assert isinstance(layer.quantized, QuantExperts) and layer.quantized.format == "nf4"
        assert layer.param.device.type == "meta"  # the owner keeps shape and dtype, no storage


def test_nf4_expert_forward_and_gradients_equal_the_dequantised_weights(pair):
    qlora, reference = pair
    for m in (qlora, reference):
        m.train()
        m(input_ids=IDS, labels=IDS).loss.backward()
    with torch.no_grad():
        assert torch.allclose(qlora(input_ids=IDS).logits, reference(input_ids=IDS).logits, atol=1e-5, rtol=0)
    ours, theirs = lk.lora_layers(qlora), lk.lora_layers(reference)
    for name, layer in ours.items():
        for f in ("lora_A", "lora_B"):
            g, ref = getattr(layer, f).grad, getattr(theirs[name], f).grad
            assert g is not None and torch.allclose(g, ref, atol=1e-5, rtol=0), (name, f)
    for m in (qlora, reference):
        m.zero_grad(set_to_none=True)


def test_only_the_routed_experts_are_decoded():
    model = quantize_base(adapted("qwen3_moe"), "int8")
    layer = next(iter(expert_layers(model).values()))  # layer 0's gate_up_proj
    store = layer.quantized
    decoded: list[int] = []
    stored_ids = {id(w): e for e, w in enumerate(store.weights)}
    real = store.decode

    def counting(stored, dtype=None):
        decoded.append(stored_ids[id(stored)])
        return real(stored, dtype)

    store.decode = counting  # the real decode runs; the list records which experts it read
    experts = model.model.layers[0].mlp.experts  # the outermost LoraParam on layer 0's experts
    hidden = torch.randn(6, 16)
    index = torch.tensor([[1, 3]] * 3 + [[3, 1]] * 3)  # experts 0 and 2 get no token
    with torch.no_grad():
        experts(hidden, index, torch.full((6, 2), 0.5))
    assert sorted(set(decoded)) == [1, 3]


def _train(model, steps: int = 6) -> list[float]:
    """AdamW steps on the one batch; the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_lora_trains_on_nf4_experts_as_on_the_dequantised_weights(pair):
    qlora, reference = copy.deepcopy(pair[0]).train(), copy.deepcopy(pair[1]).train()
    layers = expert_layers(qlora)
    stored = {n: [w.quantized_data.clone() for w in layer.quantized.weights] for n, layer in layers.items()}
    assert all("lora_" in n for n, p in qlora.named_parameters() if p.requires_grad)
    losses = _train(qlora)
    assert losses[-1] < losses[0] - 0.1 and all(x < losses[0] for x in losses[1:])
    assert losses == pytest.approx(_train(reference), abs=1e-4)  # the same steps as with the plain weights
    for n, layer in expert_layers(qlora).items():  # the quantised base stays as it was
        assert all(torch.equal(a, w.quantized_data) for a, w in zip(stored[n], layer.quantized.weights, strict=True))


def test_expert_weight_bytes_nf4_against_fp32():
    model = adapted("qwen3_moe")
    fp32 = sum(layer.param.numel() * 4 for layer in expert_layers(model).values())
    quantize_base(model, "nf4")
    nf4 = sum(layer.quantized.weight_bytes() for layer in expert_layers(model).values())
    assert 0.12 < nf4 / fp32 < 0.2  # 4-bit codes + block scales: ~0.14× fp32 at this size


def test_nf4_refuses_an_expert_not_made_of_whole_blocks():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, moe_intermediate_size=6, intermediate_size=6, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, num_experts=2, num_experts_per_tok=1,
    )  # fmt: skip
    model = lk.apply_lora(Qwen3MoeForCausalLM(cfg), lk.LoraConfig(rank=2), target_parameters=["experts.down_proj"])
    with pytest.raises(ValueError, match=r"down_proj.*blocks of 64.*\(16, 6\) has 96"):
        quantize_base(model, "nf4")
    assert expert_layers(model)["model.layers.0.mlp.experts"].quantized is None  # nothing changed
