"""DoRA: the math against a naive reference and against PEFT's DoRA (outputs, gradients, files both ways)."""

import copy
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import bases
from lorakit.saving import adapter_state_dict
from lorakit.variants import dora

sys.path.insert(0, str(Path(__file__).parents[1]))
from _tiny_models import gpt2, llama  # noqa: E402

IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(5))
TARGETS = {llama: ["q_proj", "v_proj", "down_proj"], gpt2: ["c_attn", "c_fc", "c_proj"]}


def randomise(model, seed=7):
    """Non-zero A and B, and a magnitude moved off its init, in lorakit's and PEFT's models alike."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model


def peft_load(base, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(directory), is_trainable=True).eval()


def test_row_norm_matches_the_formed_matrix():
    g = torch.Generator().manual_seed(0)
    W, A, B = torch.randn(48, 40, generator=g), torch.randn(4, 40, generator=g), torch.randn(48, 4, generator=g)
    got = dora.weight_norm(W, A, B, 0.7)
    torch.testing.assert_close(got, dora.weight_norm_reference(W, A, B, 0.7), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, dora.weight_norm(W, A, B, 0.7, dora.row_sqnorm(W)))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_layer_matches_reference_and_merges_exactly(fan_in_fan_out):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(24, 16) if fan_in_fan_out else nn.Linear(16, 24)
    layer = randomise(lk.with_lora(base, lk.LoraConfig(rank=4, alpha=8.0, use_dora=True)))
    assert layer.lora_magnitude.shape == (24,)
    x = torch.randn(3, 5, 16, requires_grad=True)
    W = bases.dense_weight(layer.base, layer.fan_in_fan_out)
    ref = dora.dora_linear_reference(
        x, W, layer.base.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scaling
    )
    y = layer(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(y.square().sum(), [x, layer.lora_A, layer.lora_B, layer.lora_magnitude])
    want = torch.autograd.grad(ref.square().sum(), [x, layer.lora_A, layer.lora_B, layer.lora_magnitude])
    for got, exp in zip(grads, want, strict=False):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer.merge()(x), y, rtol=1e-5, atol=1e-5)
        w0 = layer.base.weight.clone()
        layer.merge_()
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        layer.unmerge_()
        assert torch.equal(layer.base.weight, w0)
        torch.testing.assert_close(layer(x), y)  # the cached ‖w_i‖² follows the weight back


def _dora_base(kind, dtype=torch.float32):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(24, 16) if kind == "conv1d_hf" else nn.Linear(16, 24)  # Conv1D stores its weight (16, 24)
    with torch.no_grad():
        base.bias.normal_()  # a bias that matters
    return base.to(dtype)


@pytest.mark.parametrize("rows", [5, 64])  # 64 rows: the LoRA fast path folds B A into the weight
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv1d_hf"])
def test_fresh_dora_layer_is_the_base(kind, dtype, rows):
    """Regression: DoRA computed a Conv1D base with F.linear and added the bias apart from the GEMM, and divided
    an fp64 magnitude rounded to fp32, so a fresh DoRA layer was not its base bit for bit (fp64 off by 1e-7).

    At init m = ‖W + s·B A‖ = ‖W‖ per row (B = 0), computed by the very function the forward divides by, so
    g = m / ‖W‖ is exactly 1 in fp32 and fp64 (x / x == 1 in IEEE arithmetic) and the layer is the base bit for
    bit. In bf16 the magnitude is stored in the weight's dtype (as PEFT stores it), i.e. ‖W‖ rounded to bf16,
    so g = 1 ± 2⁻⁹: there the layer is only close to its base, by construction.
    """
    base = _dora_base(kind, dtype)
    layer = lk.with_lora(copy.deepcopy(base), lk.LoraConfig(rank=2, alpha=4, use_dora=True))
    x = torch.randn(rows, 16, dtype=dtype)
    for grad in (False, True):  # the inference path, and the autograd one (the magnitude trains)
        with torch.set_grad_enabled(grad):
            y, want = layer(x), base(x)
        if dtype is torch.bfloat16:
            torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)
        else:
            assert torch.equal(y, want), (grad, (y - want).abs().max())


@pytest.mark.parametrize("bias", ["none", "all"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("kind", ["linear", "conv1d_hf"])
def test_dora_trains_on_an_inference_tensor(kind, dropout, bias):
    """A tensor made under torch.inference_mode() fed to a training forward (as LoraLinear takes it, see
    ops._savable): the same output and gradients as its normal copy, with and without dropout."""
    layer = randomise(
        lk.with_lora(_dora_base(kind), lk.LoraConfig(rank=2, alpha=4, dropout=dropout, use_dora=True, bias=bias))
    ).train()
    with torch.inference_mode():
        x = torch.randn(3, 4, 16)
    results = []
    for inp in (x, x.clone()):  # the inference tensor, then a normal one (a clone outside inference mode)
        torch.manual_seed(1)  # the same dropout mask both times
        y = layer(inp)
        grads = torch.autograd.grad(y.square().sum(), [p for p in layer.parameters() if p.requires_grad])
        results.append((y, grads))
    assert not results[1][0].is_inference()
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for got, want in zip(results[0][1], results[1][1], strict=False):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_unsupported_types_are_refused_before_anything_changes():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(TypeError, match="DoRA.*Embedding"):
        lk.apply_lora(model, lk.LoraConfig(rank=2, use_dora=True), ["0", "1"])
    assert isinstance(model[1], nn.Linear)
    with pytest.raises(TypeError, match="DoRA"):
        lk.with_lora(nn.Conv2d(3, 4, 3), lk.LoraConfig(rank=2, use_dora=True))


@pytest.mark.parametrize("make", [llama, gpt2])
def test_outputs_and_gradients_equal_peft(make, tmp_path):
    ours = randomise(lk.apply_lora(make(), lk.LoraConfig(rank=4, alpha=8, use_dora=True), TARGETS[make]))
    lk.save_adapters(ours, tmp_path)
    theirs = peft_load(make(), tmp_path)
    assert any("lora_magnitude_vector" in n for n, _ in theirs.named_parameters())
    y_ours, y_theirs = ours(IDS).logits, theirs(IDS).logits
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-4, atol=1e-5)
    y_ours.square().mean().backward()
    y_theirs.square().mean().backward()
    g_theirs = {
        n.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p.grad
        for n, p in theirs.named_parameters()
        if p.requires_grad
    }
    state = adapter_state_dict(ours)
    assert state.keys() == {k for k in g_theirs}
    for key, p in state.items():
        torch.testing.assert_close(p.grad, g_theirs[key], rtol=1e-3, atol=1e-6, msg=key)


@pytest.mark.parametrize("make", [llama, gpt2])
def test_peft_dora_adapter_loads_in_lorakit(make, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS[make], use_dora=True, fan_in_fan_out=make is gpt2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = randomise(peft.get_peft_model(make(), cfg)).eval()
    theirs.save_pretrained(tmp_path)
    ours = lk.load_adapters(make(), tmp_path)
    assert all(layer.config.use_dora for layer in lk.lora_layers(ours).values())
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-4, atol=1e-5)
        merged = lk.merge(ours)(IDS).logits
        torch.testing.assert_close(merged, theirs(IDS).logits, rtol=1e-4, atol=1e-5)


def test_dropout_matches_peft_form():
    """With dropout PEFT feeds the dropped input to the (g-1)·x Wᵀ term too; same seed, same mask, same output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    ours = randomise(
        lk.apply_lora(copy.deepcopy(model), lk.LoraConfig(rank=4, alpha=8, dropout=0.3, use_dora=True), ["0"])
    ).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = randomise(
            peft.get_peft_model(
                copy.deepcopy(model),
                peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["0"], use_dora=True),
            )
        ).train()
    x = torch.randn(6, 16)
    torch.manual_seed(3)
    a = ours(x)
    torch.manual_seed(3)
    b = theirs(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_named_dora_adapters_round_trip(tmp_path):
    torch.manual_seed(0)
    model = lk.apply_lora(
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), lk.LoraConfig(rank=2, use_dora=True), ["0", "2"]
    )
    randomise(model)
    x = torch.randn(5, 8)
    y = model(x).detach()
    lk.save_adapters(model, tmp_path)
    layer = model[0]
    layer.adapters.add("other", lk.LoraConfig(rank=2, use_dora=True))
    from lorakit.adapters import set_adapter

    set_adapter(model, "other")
    assert model[0].lora_magnitude.requires_grad and not model[0].stash["default"].lora_magnitude.requires_grad
    set_adapter(model, "default")
    torch.testing.assert_close(model(x), y)
    torch.manual_seed(0)  # the base it was saved for (lorakit.json checks it)
    fresh = lk.load_adapters(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), tmp_path)
    fresh.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "lora" not in k and "stash" not in k}, strict=False
    )
    torch.testing.assert_close(fresh(x), y)
    layer.save_adapter(tmp_path / "one")
    other = lk.with_lora(copy.deepcopy(layer.base), lk.LoraConfig(rank=2, use_dora=True)).load_adapter(tmp_path / "one")
    torch.testing.assert_close(other.lora_magnitude, layer.lora_magnitude)
    with pytest.raises(lk.LoraFileError, match="use_dora"):
        lk.with_lora(copy.deepcopy(layer.base), lk.LoraConfig(rank=2)).load_adapter(tmp_path / "one")


def test_dora_config_without_magnitudes_is_refused(tmp_path):
    import json

    model = lk.apply_lora(llama(), lk.LoraConfig(rank=2), ["q_proj"])
    lk.save_adapters(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    fresh = llama()
    with pytest.raises(lk.LoraFileError, match="missing keys.*lora_magnitude_vector"):
        lk.load_adapters(fresh, tmp_path)
    assert not lk.lora_layers(fresh)


@pytest.mark.parametrize("change", ["data", "to_float64", "new_parameter", "in_place"])
def test_row_norm_cache_follows_the_base_weight(change):
    """Regression: the cached ‖w_i‖² survived `base.weight.data = new` (off by 0.13, or inf), because its key
    (object id + version) does not move when a Parameter's storage is replaced."""
    torch.manual_seed(0)
    layer = randomise(lk.with_lora(nn.Linear(16, 24), lk.LoraConfig(rank=4, alpha=8, use_dora=True)))
    x = torch.randn(5, 16)
    layer(x)  # fills the cache
    with torch.no_grad():
        if change == "data":
            layer.base.weight.data = torch.randn(24, 16) * 3
        elif change == "to_float64":
            layer.to(torch.float64)
            x = x.double()
        elif change == "new_parameter":
            layer.base.weight = nn.Parameter(torch.randn(24, 16), requires_grad=False)
        else:
            layer.base.weight.mul_(2)
    W = bases.dense_weight(layer.base, layer.fan_in_fan_out)
    want = dora.dora_linear_reference(
        x, W, layer.base.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scaling
    )
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_dora_is_its_own_layer_class_built_through_the_registry():
    from transformers.pytorch_utils import Conv1D

    assert type(lk.with_lora(nn.Linear(4, 4), lk.LoraConfig(rank=2, use_dora=True))) is lk.DoraLinear
    assert type(lk.with_lora(nn.Linear(4, 4), lk.LoraConfig(rank=2))) is lk.LoraLinear
    assert type(lk.with_lora(Conv1D(4, 4), lk.LoraConfig(rank=2, use_dora=True))).__name__ == "DoraConv1D"
    layer = lk.with_lora(nn.Linear(4, 4), lk.LoraConfig(rank=2))
    with pytest.raises(ValueError, match="one layer holds one variant"):
        layer.adapters.add("d", lk.LoraConfig(rank=2, use_dora=True))
    assert layer.adapters.names() == ["default"]
