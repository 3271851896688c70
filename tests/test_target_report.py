"""What target rules selected, said before training (lorakit.target_report): per rule, counts and short names,
routers named as adapted or not, and the rule and its parameter named where it selects nothing."""

import sys
from pathlib import Path

import pytest

from lorakit.target_report import LoraTargetError, describe_targets, router_weights

sys.path.insert(0, str(Path(__file__).parent))
import _moe_models  # noqa: E402
from _tiny_models import llama  # noqa: E402

ATTENTION = "self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj in 2 layers"


@pytest.fixture(scope="module")
def qwen():
    return _moe_models.tiny_qwen3_moe()


def test_all_experts_says_what_it_matched_and_that_routers_stay(qwen):
    assert describe_targets(qwen, None, ["all-experts"]) == [
        "all-experts: 4 parameters (mlp.experts.gate_up_proj, mlp.experts.down_proj in 2 layers); "
        "router weights not adapted"
    ]


def test_all_linear_on_a_moe_says_the_experts_are_not_adapted(qwen):
    assert describe_targets(qwen, None) == [
        f"all-linear: 8 modules ({ATTENTION})",
        "expert weights (3-D parameters) not adapted: target_parameters=['all-experts'] adapts them",
    ]


def test_modules_and_parameters_together_and_a_named_router(qwen):
    lines = describe_targets(qwen, ["q_proj"], ["experts.down_proj", r"re:.*layers\.0\.mlp\.gate\.weight"])
    assert lines == [
        "q_proj: 2 modules (self_attn.q_proj in 2 layers)",
        "experts.down_proj: 2 parameters (mlp.experts.down_proj in 2 layers); 1 of 2 router weights adapted",
        r"re:.*layers\.0\.mlp\.gate\.weight: 1 parameter (mlp.gate.weight in 1 layer)",
    ]


def test_gpt_oss_routers_are_found_beside_its_experts():
    model = _moe_models.tiny_gpt_oss()
    assert router_weights(model) == ["model.layers.0.mlp.router.weight", "model.layers.1.mlp.router.weight"]
    assert describe_targets(model, None, ["all-experts"])[0].endswith("in 2 layers); router weights not adapted")


@pytest.mark.parametrize(
    ("targets", "params", "param", "message"),
    [
        (None, ["experts.nope"], "target_parameters", "target parameter 'experts.nope' matches no parameter"),
        (["nope"], ["all-experts"], "targets", "target 'nope' matches no module"),
    ],
)
def test_a_rule_that_selects_nothing_names_itself_and_its_parameter(qwen, targets, params, param, message):
    with pytest.raises(LoraTargetError, match=message) as e:
        describe_targets(qwen, targets, params)
    assert e.value.param == param and isinstance(e.value, ValueError)


def test_a_dense_model_has_no_router_or_expert_notes():
    assert describe_targets(llama(), ["q_proj", "v_proj"]) == [
        "q_proj: 2 modules (self_attn.q_proj in 2 layers)",
        "v_proj: 2 modules (self_attn.v_proj in 2 layers)",
    ]
