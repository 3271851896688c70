"""LoRA on parameters (`target_parameters`, `lk.params`): PEFT's ParamWrapper is the oracle on three MoE families."""

from __future__ import annotations

import copy

import pytest
import torch
from _moe_models import BUILDERS
from _peft_params import copy_into_peft, peft_grads, peft_params_model, peft_wrappers
from _tiny_models import llama

import lorakit as lk
from lorakit.param_layers import param_paths

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
LLAMA_IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def randomise(model, seed=7):
    """Non-zero A and B in every active LoRA factor (B included: a fresh adapter is the base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and "stash." not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request):
    """(base, lorakit model with random factors, PEFT's model holding the same factors)."""
    base = BUILDERS[request.param]()
    ours = randomise(lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=2, alpha=4), target_parameters=EXPERTS))
    theirs = peft_params_model(base, EXPERTS)
    copy_into_peft(ours, theirs)
    return base, ours, theirs


def test_logits_and_factor_gradients_equal_peft(family):
    base, ours, theirs = family
    got, want = ours(IDS).logits, theirs(IDS).logits
    assert not torch.allclose(want, base(IDS).logits, atol=1e-3)  # the adapter moves the logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ours.zero_grad()
    theirs.zero_grad()
    (got**2).sum().backward()
    (want**2).sum().backward()
    grads = peft_grads(ours, theirs)
    for path, layer in param_paths(lk.lora_layers(ours)).items():
        torch.testing.assert_close(layer.lora_A.grad, grads[path][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.lora_B.grad, grads[path][1], rtol=1e-5, atol=1e-5)


def test_nesting_follows_peft(family):
    """Two parameters of one module nest as PEFT nests them: the same parameter innermost."""
    _, ours, theirs = family
    peft_inner = {p for p, w in peft_wrappers(theirs).items() if type(w.base_layer).__name__ != "ParamWrapper"}
    layers = param_paths(lk.lora_layers(ours))
    our_inner = {p for p, layer in layers.items() if not isinstance(layer.base, lk.LoraParam)}
    assert our_inner == peft_inner
    assert all(p.endswith("gate_up_proj") for p in our_inner)


def test_merge_equals_peft_merge_and_unload(family):
    _, ours, theirs = family
    with torch.no_grad():
        merged = lk.merge(copy.deepcopy(ours))
        peft_merged = copy.deepcopy(theirs).merge_and_unload()
        assert not lk.lora_layers(merged)
        want = dict(peft_merged.named_parameters())
        for name, p in merged.named_parameters():
            torch.testing.assert_close(p, want[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-5)


def test_merge_in_place_and_back_is_exact(family):
    _, ours, _ = family
    with torch.no_grad():
        before = {n: p.clone() for n, p in ours.named_parameters()}
        want = ours(IDS).logits
        lk.merge_(ours)
        torch.testing.assert_close(ours(IDS).logits, want, rtol=1e-5, atol=1e-5)
        lk.unmerge_(ours)
        assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())
        assert torch.equal(ours(IDS).logits, want)


def test_expert_biases_and_weights_nest_as_peft_on_gpt_oss():
    """Four parameters of one module (3-D weights, 2-D biases) nested; logits and gradients equal PEFT's."""
    base = BUILDERS["gpt_oss"]()
    rules = ["experts.gate_up_proj", "experts.gate_up_proj_bias", "experts.down_proj", "experts.down_proj_bias"]
    ours = randomise(lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=2, alpha=4), target_parameters=rules))
    theirs = peft_params_model(base, rules)
    copy_into_peft(ours, theirs)
    chain = [layer.param_name for layer in ours.model.layers[0].mlp.experts.chain()]
    assert chain == ["down_proj_bias", "down_proj", "gate_up_proj_bias", "gate_up_proj"]  # outermost first
    got, want = ours(IDS).logits, theirs(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    want.sum().backward()
    grads = peft_grads(ours, theirs)
    for path, layer in param_paths(lk.lora_layers(ours)).items():
        torch.testing.assert_close(layer.lora_A.grad, grads[path][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.lora_B.grad, grads[path][1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(lk.merge(ours)(IDS).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_a_linear_weight_as_a_parameter_is_module_lora_bit_for_bit(dropout):
    """On a dense model, target_parameters=['q_proj.weight', ...] computes exactly what targets=['q_proj', ...]
    does: forward and gradients equal (torch.equal), with dropout drawn from the same seed."""
    base = llama()
    cfg = lk.LoraConfig(rank=4, alpha=8, dropout=dropout)
    names = ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(1)
    modules = randomise(lk.apply_lora(copy.deepcopy(base), cfg, names)).train()
    torch.manual_seed(1)
    params = randomise(lk.apply_lora(copy.deepcopy(base), cfg, target_parameters=[f"{n}.weight" for n in names]))
    params.train()
    assert {type(layer).__name__ for layer in lk.lora_layers(params).values()} == {"LoraParam"}
    assert [n for n, p in params.named_parameters() if p.requires_grad] == [
        n for n, p in modules.named_parameters() if p.requires_grad
    ]
    for model in (modules, params):
        assert all(torch.equal(a, b) for a, b in zip(modules.parameters(), model.parameters(), strict=True))
    outs = []
    for model in (modules, params):
        torch.manual_seed(2)
        out = model(LLAMA_IDS).logits
        (out**2).mean().backward()
        outs.append((out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert torch.equal(outs[0][0], outs[1][0])
    assert outs[0][1].keys() == outs[1][1].keys()
    assert all(torch.equal(g, outs[1][1][n]) for n, g in outs[0][1].items())
    with torch.no_grad():
        a, b = lk.merge(copy.deepcopy(modules)), lk.merge(copy.deepcopy(params))
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_named_adapters_disable_and_delete_on_expert_parameters():
    base = BUILDERS["qwen3_moe"]()
    with torch.no_grad():
        plain = base(IDS).logits
        model = randomise(lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=2, alpha=4), target_parameters=EXPERTS))
        first = model(IDS).logits
        for layer in lk.lora_layers(model).values():
            layer.adapters.add("other", lk.LoraConfig(rank=3, alpha=3))
        lk.set_adapter(model, "other")
        assert lk.list_adapters(model) == ["default", "other"]
        assert {layer.rank for layer in lk.lora_layers(model).values()} == {3}
        torch.testing.assert_close(model(IDS).logits, plain)  # a fresh adapter (B = 0) is the base
        randomise(model, seed=11)
        second = model(IDS).logits
        assert not torch.allclose(second, first, atol=1e-4)
        with lk.disable_adapters(model):
            torch.testing.assert_close(model(IDS).logits, plain)
        with lk.use_adapter(model, "default"):
            torch.testing.assert_close(model(IDS).logits, first)
        lk.set_adapter(model, None)
        torch.testing.assert_close(model(IDS).logits, plain)
        assert "-" in lk.summary(model)
        lk.set_adapter(model, "default")
        lk.delete_adapter(model, "other")
        torch.testing.assert_close(model(IDS).logits, first)
        lk.delete_adapter(model, "default")
        assert not lk.lora_layers(model)
        assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
        torch.testing.assert_close(model(IDS).logits, plain)


def test_summary_names_each_parameter_and_counts_its_own_factors():
    model = lk.apply_lora(BUILDERS["qwen3_moe"](), lk.LoraConfig(rank=2, alpha=4), target_parameters=EXPERTS)
    rows = lk.summary(model).splitlines()
    gate_up = next(r for r in rows if r.startswith("model.layers.0.mlp.experts.gate_up_proj "))
    down = next(r for r in rows if r.startswith("model.layers.0.mlp.experts.down_proj "))
    assert gate_up.split()[1:5] == ["Qwen3MoeExperts", "default", "4×2×16", "4×24×2"]
    assert gate_up.split()[-1] == str(4 * 2 * 16 + 4 * 24 * 2)
    assert down.split()[3:5] == ["4×2×12", "4×16×2"] and down.split()[-1] == str(4 * 2 * 12 + 4 * 16 * 2)
    trainable, _ = lk.trainable_parameters(model)
    assert trainable == 2 * (4 * 2 * 16 + 4 * 24 * 2 + 4 * 2 * 12 + 4 * 16 * 2)


def test_a_mixed_batch_over_parameter_lora_is_refused_clearly():
    model = lk.apply_lora(BUILDERS["qwen3_moe"](), lk.LoraConfig(rank=2), target_parameters=EXPERTS)
    refused = pytest.raises(lk.LoraStateError, match=r"mixed-adapter batches are not supported on parameter LoRA")
    with refused, lk.mixed_batch(model, ["default", None]):
        model(IDS[:2])
