"""LoRA on parameters (`target_parameters`, `lk.params`): PEFT's ParamWrapper is the oracle on three MoE families."""

from __future__ import annotations

import copy

import pytest
import torch
from _moe_models import BUILDERS
from _peft_params import copy_into_peft, peft_grads, peft_params_model, peft_wrappers

import lorakit as lk
from lorakit.param_layers import param_paths

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def randomise(model, seed=7):
    """Non-zero A and B in every LoRA factor (B included: a fresh adapter is the base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
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
