"""files.expert_layout against PEFT 0.21 itself: its flat factors of every tiny MoE family give PEFT's own delta,
both layouts' shapes, the version rule, and the refusals (ambiguous, contradicting, another expert count)."""

import pytest
import torch
from _moe_models import BUILDERS

from lorakit.errors import LoraFileError
from lorakit.files import expert_layout as el
from lorakit.files.expert_layout import CURRENT, LEGACY, ParamGeometry

RANK, ALPHA = 2, 4


def delta_from_file(A, B, geometry, rank, scaling, layout=CURRENT):
    """The delta of each expert laid into the parameter's own layout, from a file's flat tensors (no PEFT code)."""
    A_e, B_e = el.to_experts(A, B, geometry, rank, layout)
    if A_e.dim() == 2:
        return scaling * B_e @ A_e
    delta = scaling * torch.bmm(B_e, A_e)  # (E, out, in)
    return delta.transpose(1, 2) if geometry.transposed else delta


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def peft021(request):
    """A PEFT 0.21 model of one family with random factors on both expert parameters, and its experts module."""
    from peft import LoraConfig, get_peft_model

    model = BUILDERS[request.param]()
    torch.manual_seed(3)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[], target_parameters=["gate_up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape))
    return peft_model


def test_peft_021_flat_factors_give_peft_delta(peft021):
    from peft.tuners.lora import ParamWrapper

    wrappers = [m for m in peft021.modules() if isinstance(m, ParamWrapper)]
    assert {w.parameter_name for w in wrappers} == {"gate_up_proj", "down_proj"}
    for w in wrappers:
        param = w.get_param()
        g = ParamGeometry(tuple(param.shape), bool(getattr(w.get_base_layer(), "is_transposed", False)))
        A, B = w.lora_A["default"].weight, w.lora_B["default"].weight
        assert (tuple(A.shape), tuple(B.shape)) == el.file_shapes(g, RANK)
        assert el.detect(w.parameter_name, g, RANK, (tuple(A.shape), tuple(B.shape)), "0.21.2") == CURRENT
        torch.testing.assert_close(delta_from_file(A, B, g, RANK, ALPHA / RANK), w.get_delta_weight("default"))
        a, b = el.from_experts(*el.to_experts(A, B, g, RANK))
        assert torch.equal(a, A) and torch.equal(b, B)


def test_two_d_parameter_is_a_linear():
    g = ParamGeometry((6, 4))
    assert el.file_shapes(g, 2) == el.file_shapes(g, 2, LEGACY) == ((2, 4), (6, 2))
    assert el.expert_shapes(g, 2) == ((2, 4), (6, 2))
    A, B = torch.randn(2, 4), torch.randn(6, 2)
    assert el.to_experts(A, B, g, 2)[0] is A and el.from_experts(A, B)[1] is B
    assert el.detect("fc.weight", g, 2, ((2, 4), (6, 2)), None) == CURRENT


def test_legacy_conversion_keeps_the_delta():
    g = ParamGeometry((3, 10, 6))  # not transposed: legacy in/out (10, 6), current (6, 10)
    A_old, B_old = torch.randn(3 * 2, 10), torch.randn(6, 2 * 3)
    assert (tuple(A_old.shape), tuple(B_old.shape)) == el.file_shapes(g, 2, LEGACY)
    # PEFT 0.18's rule: einsum("o r e, e r i -> e i o"), laid into P as it is
    legacy = torch.einsum("ore,eri->eio", B_old.reshape(6, 2, 3), A_old.reshape(3, 2, 10))
    torch.testing.assert_close(delta_from_file(A_old, B_old, g, 2, 1.0, LEGACY), legacy)
    A, B = el.from_experts(*el.to_experts(A_old, B_old, g, 2, LEGACY))
    assert (tuple(A.shape), tuple(B.shape)) == el.file_shapes(g, 2)
    torch.testing.assert_close(delta_from_file(A, B, g, 2, 1.0), legacy)


@pytest.mark.parametrize(
    ("version", "layout"),
    [("0.18.1", LEGACY), ("0.18.0@abc123", LEGACY), ("0.17.0", LEGACY), ("0.19.0", CURRENT), ("0.21.2", CURRENT),
     ("1.0.0", CURRENT), ("0.19.0.dev0", None), ("0.19.0rc1", None), (None, None), ("weird", None), (19, None)],
)  # fmt: skip
def test_layout_of_version(version, layout):
    assert el.layout_of_version(version) == layout


def test_detect_by_shapes_without_a_version():
    g = ParamGeometry((4, 24, 16))
    assert el.detect("e.gate_up_proj", g, 2, el.file_shapes(g, 2, LEGACY), None) == LEGACY
    assert el.detect("e.gate_up_proj", g, 2, el.file_shapes(g, 2), None) == CURRENT
    t = ParamGeometry((4, 16, 24), transposed=True)  # gpt-oss: both layouts are one
    assert el.detect("e.gate_up_proj", t, 2, el.file_shapes(t, 2), "0.18.1") == CURRENT


def test_square_expert_without_version_is_refused():
    g = ParamGeometry((4, 16, 16))
    with pytest.raises(LoraFileError, match=r"'m.experts.gate_up_proj'.*\(4, 16, 16\).*lora_A \(8, 16\).*peft_version"):
        el.detect("m.experts.gate_up_proj", g, 2, el.file_shapes(g, 2), None)
    assert el.detect("m.experts.gate_up_proj", g, 2, el.file_shapes(g, 2), "0.18.1") == LEGACY
    assert el.detect("m.experts.gate_up_proj", g, 2, el.file_shapes(g, 2), "0.20.0") == CURRENT


def test_version_contradicting_the_shapes_is_refused():
    g = ParamGeometry((4, 24, 16))
    with pytest.raises(LoraFileError, match=r"peft_version '0.21.2'.*PEFT >= 0.19.*lora_A \(8, 24\).*PEFT <= 0.18"):
        el.detect("x.down_proj", g, 2, el.file_shapes(g, 2, LEGACY), "0.21.2")


def test_other_expert_count_is_refused_naming_both_shapes():
    g = ParamGeometry((4, 24, 16))
    found = el.file_shapes(ParamGeometry((8, 24, 16)), 2)  # an 8-expert adapter for a 4-expert model
    with pytest.raises(
        LoraFileError, match=r"'x.gate_up_proj' of shape \(4, 24, 16\) \(4 experts.*found lora_A \(16, 16\)"
    ):
        el.detect("x.gate_up_proj", g, 2, found, "0.21.2")
    with pytest.raises(ValueError, match="not a rank-2 PEFT >= 0.19 adapter of a 4-expert"):
        el.to_experts(torch.zeros(16, 16), torch.zeros(24, 16), g, 2)
