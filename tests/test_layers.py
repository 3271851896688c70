"""LoRA layers, table-driven over layer types and dtypes; the math pinned against naive references.

This module needs only torch: transformers' GPT-2 Conv1D runs the same checks in test_layers_hf.py.
"""

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import ops

DTYPES = [torch.float32, torch.bfloat16]


def make(kind, dtype=torch.float32, bias=True):
    """(base module, example input) for each supported layer type."""
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(6, 5, bias=bias).to(dtype), torch.randn(3, 4, 6, dtype=dtype)
    if kind == "conv1d_hf":  # test_layers_hf.py
        from transformers.pytorch_utils import Conv1D

        m = Conv1D(5, 6).to(dtype)  # nf=5 out, nx=6 in; weight stored (6, 5)
        nn.init.normal_(m.weight, std=0.2)
        nn.init.normal_(m.bias)
        return m, torch.randn(3, 4, 6, dtype=dtype)
    if kind == "embedding":
        return nn.Embedding(11, 5, padding_idx=0).to(dtype), torch.randint(0, 11, (3, 4))
    if kind == "conv1d":
        return nn.Conv1d(3, 4, 3, padding=1, bias=bias).to(dtype), torch.randn(2, 3, 7, dtype=dtype)
    if kind == "conv2d":
        return nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=bias).to(dtype), torch.randn(2, 3, 6, 6, dtype=dtype)
    raise AssertionError(kind)


KINDS = ["linear", "embedding", "conv1d", "conv2d"]  # and "conv1d_hf", in test_layers_hf.py


def randomise(layer):
    """Give A and B non-zero values so the LoRA branch matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    return layer


def naive(layer, x):
    """The formula with the delta added to the weight, written out per type (no dropout)."""
    base = layer.base
    w = base.weight.float() + layer.weight_delta()
    if isinstance(layer, lk.LoraConv1D):  # transformers' Conv1D: weight (d_in, d_out)
        return x.float() @ w + base.bias.float()
    if isinstance(base, nn.Embedding):
        return nn.functional.embedding(x, w, base.padding_idx)
    if isinstance(base, nn.Linear):
        return nn.functional.linear(x.float(), w, None if base.bias is None else base.bias.float())
    b = None if base.bias is None else base.bias.float()
    return base._conv_forward(x.float(), w, b)


def close(a, b, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_known_values_torch_orientation():
    layer = lk.with_lora(nn.Linear(3, 2), lk.LoraConfig(rank=1, alpha=2.0))
    with torch.no_grad():
        layer.base.weight.copy_(torch.tensor([[1.0, 3, 5], [2, 4, 6]]))
        layer.base.bias.copy_(torch.tensor([0.1, 0.2]))
        layer.lora_A.copy_(torch.tensor([[0.1, 0.2, 0.3]]))
        layer.lora_B.copy_(torch.tensor([[0.5], [0.6]]))
    x = torch.ones(1, 3)
    expected = torch.tensor([[9.7, 12.92]])
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.merge()(x), expected)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)  # the inference path too


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_fresh_layer_is_exactly_the_base(kind, dtype):
    base, x = make(kind, dtype)
    expected = base(x)
    layer = lk.with_lora(copy.deepcopy(base), lk.LoraConfig(rank=2, alpha=4))
    assert torch.equal(layer(x), expected)
    assert layer.lora_A.dtype == dtype and not torch.all(layer.lora_A == 0)
    assert torch.all(layer.lora_B == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_naive_formula_and_merge(kind, dtype):
    base, x = make(kind, dtype)
    layer = randomise(lk.with_lora(base, lk.LoraConfig(rank=3, alpha=6)))
    y = layer(x)
    assert y.dtype == dtype
    close(y, naive(layer, x), dtype)
    plain = layer.merge()
    assert type(plain) is type(base) and not isinstance(plain, lk.LoraLayer)
    close(plain(x), y, dtype)
    assert not any(p.requires_grad for p in plain.parameters())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_inplace_merge_and_exact_unmerge(kind, dtype):
    base, x = make(kind, dtype)
    layer = randomise(lk.with_lora(base, lk.LoraConfig(rank=2, alpha=2)))
    before = layer.base.weight.detach().clone()
    y = layer(x)
    layer.eval()
    assert not layer.merged  # eval() never merges
    layer.merge_()
    assert layer.merged
    close(layer(x), y, dtype)
    with pytest.raises(lk.LoraStateError, match="already merged"):
        layer.merge_()
    layer.unmerge_()
    assert torch.equal(layer.base.weight, before)  # bit for bit
    with pytest.raises(lk.LoraStateError, match="not merged"):
        layer.unmerge_()


@pytest.mark.parametrize("bias", ["none", "all"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_only_the_adapter(kind, bias):
    base, x = make(kind)
    layer = randomise(lk.with_lora(base, lk.LoraConfig(rank=2, bias=bias)))
    out = layer(x)
    out.float().pow(2).sum().backward()
    assert layer.base.weight.grad is None and not layer.base.weight.requires_grad
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    has_bias = getattr(layer.base, "bias", None) is not None
    if has_bias:
        assert (layer.base.bias.grad is not None) == (bias == "all")
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"} | ({"base.bias"} if bias == "all" and has_bias else set())


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_gradients_match_naive_autograd(kind):
    base, x = make(kind)
    layer = randomise(lk.with_lora(base, lk.LoraConfig(rank=3, alpha=5, bias="all")))
    if x.is_floating_point():
        x.requires_grad_(True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    got = [layer.lora_A.grad, layer.lora_B.grad] + ([x.grad] if x.is_floating_point() else [])
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(x.is_floating_point())
    ref_layer = copy.deepcopy(layer)
    del ref_layer.lora_A, ref_layer.lora_B  # swap the parameters for plain leaf tensors
    ref_layer.lora_A, ref_layer.lora_B = A, B
    naive(ref_layer, x2).backward(g)
    want = [A.grad, B.grad] + ([x2.grad] if x.is_floating_point() else [])
    for a, b in zip(got, want, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dropout_only_on_the_branch_and_only_in_training():
    torch.manual_seed(0)
    layer = randomise(lk.with_lora(nn.Linear(16, 8), lk.LoraConfig(rank=2, dropout=0.5)))
    x = torch.randn(64, 16)
    layer.eval()
    close(layer(x), naive(layer, x), torch.float32)
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.allclose(y1, y2)  # a fresh mask per call
    base_out = layer.base(x)
    # with the branch switched off the output is the base output: dropout never touches the base path
    with torch.no_grad():
        layer.lora_B.zero_()
    assert torch.equal(layer(x), base_out)


def test_gaussian_and_kaiming_init():
    torch.manual_seed(0)
    g = lk.with_lora(nn.Linear(2048, 8), lk.LoraConfig(rank=4, init="gaussian"))
    assert abs(g.lora_A.std().item() - 0.25) < 0.01  # std 1/r, as PEFT
    k = lk.with_lora(nn.Linear(300, 8), lk.LoraConfig(rank=4))
    bound = 1 / 300**0.5  # torch's Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert k.lora_A.abs().max() <= bound and k.lora_A.abs().max() > 0.9 * bound


def test_unsupported_type_lists_supported():
    with pytest.raises(TypeError) as e:
        lk.with_lora(nn.LayerNorm(4), lk.LoraConfig(rank=2))
    msg = str(e.value)
    assert "LayerNorm" in msg and "Linear" in msg and "Embedding" in msg and "Conv2d" in msg


def test_wrapping_twice_and_grouped_conv_refused():
    layer = lk.with_lora(nn.Linear(4, 4), lk.LoraConfig(rank=2))
    with pytest.raises(lk.LoraStateError, match="already has LoRA"):
        lk.with_lora(layer, lk.LoraConfig(rank=2))
    with pytest.raises(TypeError, match="groups=2"):
        lk.with_lora(nn.Conv2d(4, 4, 3, groups=2), lk.LoraConfig(rank=2))


def test_merge_refuses_non_finite_and_changes_nothing():
    layer = lk.with_lora(nn.Linear(4, 4), lk.LoraConfig(rank=1))
    with torch.no_grad():
        layer.lora_A.fill_(1e30)
        layer.lora_B.fill_(1e30)
    before = layer.base.weight.detach().clone()
    with pytest.raises(lk.LoraMergeError, match="non-finite"):
        layer.merge_()
    with pytest.raises(lk.LoraMergeError):
        layer.merge()
    assert torch.equal(layer.base.weight, before) and not layer.merged


def test_merge_keeps_a_trained_bias():
    layer = randomise(lk.with_lora(nn.Linear(4, 3), lk.LoraConfig(rank=2, bias="all")))
    with torch.no_grad():
        layer.base.bias.add_(1.0)
    plain = layer.merge()
    assert torch.equal(plain.bias, layer.base.bias)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_file_round_trip(kind, tmp_path):
    base, x = make(kind)
    layer = randomise(lk.with_lora(base, lk.LoraConfig(rank=2, alpha=3, bias="all")))
    path = layer.save_adapter(tmp_path / "layer")
    assert path.name == "layer.safetensors"
    fresh, _ = make(kind)
    loaded = lk.with_lora(fresh, lk.LoraConfig(rank=2, bias="all")).load_adapter(tmp_path / "layer")
    assert loaded.config.alpha == 3.0  # the file's config governs scaling
    assert torch.equal(loaded(x), layer(x))


def _state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _assert_unchanged(layer, state):
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())


@pytest.mark.parametrize(
    "make_target,needle",
    [
        (lambda: lk.with_lora(nn.Linear(6, 7), lk.LoraConfig(rank=2)), "shape"),
        (lambda: lk.with_lora(nn.Linear(6, 5), lk.LoraConfig(rank=3)), "rank"),
        (lambda: lk.with_lora(nn.Embedding(6, 5), lk.LoraConfig(rank=2)), "LoraEmbedding"),
    ],
)
def test_layer_load_refuses_mismatch_and_changes_nothing(make_target, needle, tmp_path):
    lk.with_lora(nn.Linear(6, 5), lk.LoraConfig(rank=2)).save_adapter(tmp_path / "a")
    target = make_target()
    state = _state(target)
    with pytest.raises(lk.LoraFileError, match=needle):
        target.load_adapter(tmp_path / "a")
    _assert_unchanged(target, state)


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda b: b[: len(b) - 7], "truncated"),
        (lambda b: b[:5], "not a valid safetensors file: .*header too small"),
        (lambda b: b"", "not a valid safetensors file: .*header too small"),
        (lambda b: (10**12).to_bytes(8, "little") + b[8:], "header too large"),
        (lambda b: b[:8] + b"}" + b[9:], "invalid JSON in header"),
    ],
)
def test_layer_load_refuses_damaged_file(damage, needle, tmp_path):
    path = lk.with_lora(nn.Linear(6, 5), lk.LoraConfig(rank=2)).save_adapter(tmp_path / "a")
    path.write_bytes(damage(path.read_bytes()))
    target = lk.with_lora(nn.Linear(6, 5), lk.LoraConfig(rank=2))
    state = _state(target)
    with pytest.raises(lk.LoraFileError, match=needle):
        target.load_adapter(path)
    _assert_unchanged(target, state)


def test_layer_load_refuses_nan_unless_allowed(tmp_path):
    src = lk.with_lora(nn.Linear(6, 5), lk.LoraConfig(rank=2))
    with torch.no_grad():
        src.lora_B[0, 0] = float("nan")
    src.save_adapter(tmp_path / "a")
    target = lk.with_lora(nn.Linear(6, 5), lk.LoraConfig(rank=2))
    with pytest.raises(lk.LoraFileError, match="NaN"):
        target.load_adapter(tmp_path / "a")
    target.load_adapter(tmp_path / "a", allow_nonfinite=True)
    assert torch.isnan(target.lora_B[0, 0])


def test_layer_file_round_trip_keeps_every_tensor_and_the_config(tmp_path):
    for config in (lk.LoraConfig(rank=2, alpha=3, bias="all"), lk.LoraConfig(rank=2, use_dora=True)):
        src = randomise(lk.with_lora(nn.Linear(6, 5), config))
        path = src.save_adapter(tmp_path / "a")
        target = lk.with_lora(
            nn.Linear(6, 5), lk.LoraConfig(rank=2, alpha=1, bias=config.bias.value, use_dora=config.use_dora)
        )
        assert target.load_adapter(path) is target
        assert target.config == src.config
        skip = {"base.weight"} | ({"base.bias"} if config.bias is lk.LoraBias.NONE else set())  # the base's own
        want = {k: v for k, v in src.state_dict().items() if k not in skip}  # factors, magnitude, trained bias
        assert all(torch.equal(target.state_dict()[k], v) for k, v in want.items())


def test_layer_load_into_a_merged_layer_is_refused(tmp_path):
    path = randomise(lk.with_lora(nn.Linear(6, 5), lk.LoraConfig(rank=2))).save_adapter(tmp_path / "a")
    target = lk.with_lora(nn.Linear(6, 5), lk.LoraConfig(rank=2)).merge_()
    state = _state(target)
    with pytest.raises(lk.LoraStateError, match="merged in place"):
        target.load_adapter(path)
    _assert_unchanged(target, state)


def test_reference_formula_function():
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 4), torch.randn(3, 4), torch.randn(3)
    A, B = torch.randn(2, 4), torch.randn(3, 2)
    want = x @ (w + 1.5 * B @ A).t() + b
    torch.testing.assert_close(ops.lora_linear_reference(x, w, b, A, B, 1.5), want)
    torch.testing.assert_close(ops.lora_linear(x, w, b, A, B, 1.5), want)


@pytest.mark.parametrize(
    "module,config,needle",
    [
        (lambda: nn.Conv2d(4, 4, 3, groups=2), lk.LoraConfig(rank=2), "groups=2"),
        (lambda: nn.Linear(4, 3), lk.LoraConfig(rank=4, init="pissa"), "rank <= min"),
        (lambda: nn.Embedding(6, 4), lk.LoraConfig(rank=2, init="olora"), "linear layers only"),
        (lambda: nn.Embedding(6, 4), lk.LoraConfig(rank=2, use_dora=True), "DoRA"),
    ],
)
def test_refused_wrap_leaves_the_module_trainable_and_unchanged(module, config, needle):
    m = module()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises((TypeError, ValueError), match=needle):
        lk.with_lora(m, config)
    assert all(p.requires_grad for p in m.parameters())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_no_active_adapter_is_a_state_error_not_a_missing_attribute():
    """Regression (found by mypy: config and the factors are None with no active adapter): `layer.rank` and
    `layer.scaling` read as missing attributes (nn.Module swallowed the property's AttributeError), and
    `layer_tensors` looked for an adapter called None. Each now says that no adapter is active."""
    from lorakit.layer_io import layer_tensors

    layer = lk.with_lora(nn.Linear(4, 4), lk.LoraConfig(rank=2))
    layer.adapters.activate(None)
    reads = (lambda: layer.rank, lambda: layer.scaling, lambda: layer_tensors(layer), lambda: layer.active_factors())
    for read in reads:
        with pytest.raises(lk.LoraStateError, match="no active adapter"):
            read()
    assert torch.equal(layer(torch.ones(1, 4)), layer.base(torch.ones(1, 4)))  # the base alone, as before
    layer.adapters.activate("default")
    assert (layer.rank, layer.scaling) == (2, 0.5)
