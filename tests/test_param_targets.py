"""Which parameters `target_parameters` and `lk.params` select, and how a bad selection is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from _moe_models import tiny_gpt_oss, tiny_qwen3_moe
from torch import nn

import lorakit as lk
from lorakit.param_layers import param_paths


@pytest.fixture(scope="module")
def gpt_oss():
    return tiny_gpt_oss()


def adapted(model):
    return sorted(param_paths(lk.lora_layers(model)))


def experts_paths(suffixes, layers=2):
    return sorted(f"model.layers.{i}.mlp.experts.{s}" for i in range(layers) for s in suffixes)


def test_all_experts_takes_the_3d_expert_weights_only(gpt_oss):
    """Never the router, never the biases (2-D here, so eligible), never attention."""
    model = lk.apply_lora(copy.deepcopy(gpt_oss), lk.LoraConfig(rank=2), target_parameters=["all-experts"])
    assert adapted(model) == experts_paths(["gate_up_proj", "down_proj"])
    assert not lk.lora_layers(model).keys() - {
        f"model.layers.{i}.mlp.experts{s}" for i in range(2) for s in ("", ".base")
    }


def test_suffix_exact_and_regex_rules(gpt_oss):
    cfg = lk.LoraConfig(rank=2)
    model = lk.apply_lora(copy.deepcopy(gpt_oss), cfg, target_parameters="model.layers.1.mlp.experts.down_proj")
    assert adapted(model) == ["model.layers.1.mlp.experts.down_proj"]
    model = lk.apply_lora(copy.deepcopy(gpt_oss), cfg, target_parameters=[r"re:.*\.experts\.\w+_bias"])
    assert adapted(model) == experts_paths(["gate_up_proj_bias", "down_proj_bias"])
    model = lk.apply_lora(copy.deepcopy(gpt_oss), cfg, target_parameters=["router.weight", "q_proj.weight"])
    assert adapted(model) == sorted(
        f"model.layers.{i}.{p}" for i in range(2) for p in ("mlp.router.weight", "self_attn.q_proj.weight")
    )


def test_targets_none_is_all_linear_without_parameters_and_nothing_with_them(gpt_oss):
    plain = lk.apply_lora(copy.deepcopy(gpt_oss), lk.LoraConfig(rank=2))
    assert {type(layer).__name__ for layer in lk.lora_layers(plain).values()} == {"LoraLinear"}
    assert "model.layers.0.self_attn.q_proj" in lk.lora_layers(plain)
    params_only = lk.apply_lora(copy.deepcopy(gpt_oss), lk.LoraConfig(rank=2), target_parameters=["all-experts"])
    assert {type(layer).__name__ for layer in lk.lora_layers(params_only).values()} == {"LoraParam"}
    both = lk.apply_lora(copy.deepcopy(gpt_oss), lk.LoraConfig(rank=2), ["q_proj"], target_parameters=["all-experts"])
    assert {type(layer).__name__ for layer in lk.lora_layers(both).values()} == {"LoraParam", "LoraLinear"}


def test_params_groups_combine_like_burns_param_groups(gpt_oss):
    seen = []

    def three_d(path, p):
        seen.append((path, p.dim()))
        return p.dim() == 3

    group = lk.params(three_d) - lk.params(include=["re:model\\.layers\\.0\\..*"])
    model = lk.apply_lora(copy.deepcopy(gpt_oss), lk.LoraConfig(rank=2), targets=group)
    assert adapted(model) == ["model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"]
    assert seen and all(dim in (2, 3) for _, dim in seen)  # fn is asked about adaptable parameters only
    union = lk.params(include=["down_proj"]) | lk.params(
        include=["router.weight"], exclude=["layers.1.mlp.router.weight"]
    )
    model = lk.apply_lora(copy.deepcopy(gpt_oss), lk.LoraConfig(rank=2), targets=union & lk.params(lambda _, p: True))
    assert adapted(model) == sorted([*experts_paths(["down_proj"]), "model.layers.0.mlp.router.weight"])


def test_a_rule_matching_nothing_names_it_and_lists_what_can_be_targeted(gpt_oss):
    before = {n: p.clone() for n, p in gpt_oss.named_parameters()}
    with pytest.raises(ValueError, match=r"'experts\.up_proj' matches no parameter.*experts\.gate_up_proj"):
        lk.apply_lora(gpt_oss, lk.LoraConfig(rank=2), target_parameters=["experts.gate_up_proj", "experts.up_proj"])
    assert not lk.lora_layers(gpt_oss)
    assert all(p.requires_grad and torch.equal(p, before[n]) for n, p in gpt_oss.named_parameters())
    with pytest.raises(ValueError, match=r"selects no parameter"):
        lk.apply_lora(gpt_oss, lk.LoraConfig(rank=2), targets=lk.params(lambda path, p: False))
    with pytest.raises(ValueError, match=r"not a valid regex"):
        lk.apply_lora(gpt_oss, lk.LoraConfig(rank=2), target_parameters=["re:("])


def test_1d_and_non_float_parameters_are_refused_by_name(gpt_oss):
    with pytest.raises(TypeError, match=r"'model\.layers\.0\.mlp\.router\.bias' has shape \(4,\) \(1-D\)"):
        lk.apply_lora(gpt_oss, lk.LoraConfig(rank=2), target_parameters=["router.bias"])
    net = nn.Sequential(nn.Linear(4, 4))
    net[0].register_parameter("codes", nn.Parameter(torch.zeros(4, 4, dtype=torch.long), requires_grad=False))
    with pytest.raises(TypeError, match=r"'0\.codes' is torch\.int64"):
        lk.apply_lora(net, lk.LoraConfig(rank=2), target_parameters=["codes"])
    conv = nn.Sequential(nn.Conv2d(2, 2, 3))
    with pytest.raises(TypeError, match=r"'0\.weight' has shape \(2, 2, 3, 3\) \(4-D\)"):
        lk.apply_lora(conv, lk.LoraConfig(rank=2), target_parameters=["0.weight"])


def test_what_peft_refuses_on_parameters_is_refused():
    model = tiny_qwen3_moe()
    with pytest.raises(ValueError, match="DoRA"):
        lk.apply_lora(model, lk.LoraConfig(rank=2, use_dora=True), target_parameters=["all-experts"])
    with pytest.raises(ValueError, match="dropout"):  # no input to drop on a router-less 2-D parameter of a norm
        lk.apply_lora(model, lk.LoraConfig(rank=2, dropout=0.1), target_parameters=["embed_tokens.weight"])
    with pytest.raises(ValueError, match="targeted as a module and by its parameters"):
        lk.apply_lora(model, lk.LoraConfig(rank=2), ["q_proj"], target_parameters=["q_proj.weight"])
    assert not lk.lora_layers(model)
    oss = tiny_gpt_oss()  # an expert bias (E, d_out) has no input to drop: refused, not silently run without dropout
    with pytest.raises(ValueError, match=r"dropout on GptOssExperts\.gate_up_proj_bias"):
        lk.apply_lora(oss, lk.LoraConfig(rank=2, dropout=0.1), target_parameters=["experts.gate_up_proj_bias"])
    assert not lk.lora_layers(oss)


def test_rank_pattern_applies_per_parameter_path(gpt_oss):
    cfg = lk.LoraConfig(rank=2, rank_pattern={"layers.0.mlp.experts.down_proj": 3})
    model = lk.apply_lora(copy.deepcopy(gpt_oss), cfg, target_parameters=["all-experts"])
    ranks = {path: layer.rank for path, layer in param_paths(lk.lora_layers(model)).items()}
    assert ranks["model.layers.0.mlp.experts.down_proj"] == 3
    assert ranks["model.layers.0.mlp.experts.gate_up_proj"] == ranks["model.layers.1.mlp.experts.down_proj"] == 2
