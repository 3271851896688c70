"""QLoRA: quantised frozen bases (NF4 via torchao, per-row int8), dequantised on the fly in forward and backward."""

import copy

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import ops
from lorakit.variants.quant import Int8Linear, NF4Linear, QuantLinear, quantize_base, quantize_int8, quantized_layers

pytest.importorskip("torchao")

FORMATS = ["nf4", "int8"]
REL_ERR = {"nf4": 0.12, "int8": 0.01}  # relative weight error of 4-bit NF4 (~0.09) and int8 absmax (~0.005)


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 8)).to(dtype)


def wrapped(dtype=torch.float32, **kw):
    model = lk.apply_lora(mlp(dtype), lk.LoraConfig(rank=4, alpha=8, **kw), ["0", "2"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_int8_round_trip_is_per_row_absmax():
    w = torch.randn(16, 40)
    q = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == (16, 44)
    d = Int8Linear.decode(q)
    assert (d - w).abs().max(dim=1).values.le(w.abs().amax(dim=1) / 254 + 1e-6).all()
    assert Int8Linear.decode(q, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_backward_equal_the_dequantised_reference_without_keeping_dense_weights(fmt):
    model = wrapped()
    x = torch.randn(5, 64, requires_grad=True)
    y_full = model(x).detach()
    quantize_base(model, fmt)
    assert set(quantized_layers(model)) == {"0", "2"}
    layer = model[0]
    W = layer.base.dequantize()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, type(t).__name__))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = layer(x)
    assert not any(
        shape == tuple(W.shape) and name == "Tensor" and dt.is_floating_point for shape, dt, name in saved
    ), f"a dense copy of W was saved for backward: {saved}"
    ref = ops.lora_linear_reference(x, W, layer.base.bias, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(h.square().sum(), [x, layer.lora_A, layer.lora_B])
    want = torch.autograd.grad(ref.square().sum(), [x, layer.lora_A, layer.lora_B])
    for a, b in zip(got, want, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert rel(model(x), y_full) < REL_ERR[fmt]
    with torch.no_grad():  # the inference path dequantises too
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_training_on_cpu_and_dense_merge(fmt):
    model = quantize_base(wrapped(), fmt)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(32, 64), torch.randn(32, 8)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if "base" in n)
    with pytest.raises(lk.LoraStateError, match="quantised"):
        model[0].merge_()
    with torch.no_grad():
        y = model(x)
        merged = lk.merge(model)
        assert type(merged[0]) is nn.Linear and merged[0].weight.dtype == torch.float32
        torch.testing.assert_close(merged(x), y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_adapters_from_a_quantised_model_load_into_the_full_one(fmt, tmp_path):
    model = quantize_base(wrapped(), fmt)
    lk.save_adapters(model, tmp_path)
    full = lk.load_adapters(mlp(), tmp_path)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert rel(full(x), model(x)) < REL_ERR[fmt]
        again = quantize_base(lk.load_adapters(mlp(), tmp_path), fmt)
        torch.testing.assert_close(again(x), model(x))
        lk.load_adapters(again, tmp_path)  # into a quantised model: the hot path


@pytest.mark.parametrize("fmt", FORMATS)
def test_gpt2_conv1d_bf16_and_dora(fmt):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=50, n_positions=32)).eval()
    ids = torch.randint(0, 50, (2, 8))
    model = lk.apply_lora(
        copy.deepcopy(base).to(torch.bfloat16), lk.LoraConfig(rank=4, use_dora=True), ["c_attn", "c_fc"]
    )
    quantize_base(model, fmt)
    assert isinstance(model.transformer.h[0].attn.c_attn.base, QuantLinear)
    out = model(ids).logits
    out.float().square().mean().backward()
    assert model.transformer.h[0].mlp.c_fc.lora_magnitude.grad is not None
    with torch.no_grad():
        assert rel(out, base(ids).logits) < 3 * REL_ERR[fmt] + 0.02  # bf16 rounding on top
        merged = lk.merge(model)
        assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
        assert merged.transformer.h[0].attn.c_attn.weight.shape == base.transformer.h[0].attn.c_attn.weight.shape
        torch.testing.assert_close(merged(ids).logits, out, rtol=0.05, atol=0.05)


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="format"):
        quantize_base(wrapped(), "fp3")
    with pytest.raises(ValueError, match="apply_lora"):
        quantize_base(mlp(), "int8")
    model = quantize_base(wrapped(), "int8")
    with pytest.raises(lk.LoraStateError, match="already quantised"):
        quantize_base(model, "int8")
    odd = lk.apply_lora(nn.Sequential(nn.Linear(5, 7)), lk.LoraConfig(rank=2), ["0"])
    with pytest.raises(ValueError, match="divisible"):
        quantize_base(odd, "nf4")
    assert not quantized_layers(odd)


@pytest.mark.parametrize("fmt", FORMATS)
def test_small_layers_deepcopy_save_and_load_exactly(fmt, tmp_path):
    """Regression: deepcopy of an NF4 Linear(64, 64) failed inside torchao (it re-quantises with its default
    scaler block of 256, and a 64×64 weight has only 64 blocks). The copy must hold the very same stored values."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 64))
    model = quantize_base(lk.apply_lora(copy.deepcopy(dense), lk.LoraConfig(rank=2, use_dora=True), ["0"]), fmt)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = model(x)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(x), y)
        w, w2 = model[0].base.weight, twin[0].base.weight
        assert type(w2) is type(w) and torch.equal(model[0].base.dequantize(), twin[0].base.dequantize())
        w2_inner = getattr(w2, "quantized_data", w2)
        assert w2_inner.data_ptr() != getattr(w, "quantized_data", w).data_ptr()  # a copy, not shared storage
        lk.save_adapters(model, tmp_path)
        again = quantize_base(lk.load_adapters(copy.deepcopy(dense), tmp_path), fmt)
        assert torch.equal(again(x), y)
        fresh = quantize_base(lk.apply_lora(copy.deepcopy(dense), lk.LoraConfig(rank=2, use_dora=True), ["0"]), fmt)
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh(x), y)


def test_dora_row_norm_follows_a_requantised_base():
    """The cached ‖w_i‖² is keyed on the base weight, so swapping in a quantised base recomputes it."""
    torch.manual_seed(0)
    model = lk.apply_lora(mlp(), lk.LoraConfig(rank=4, use_dora=True), ["0"])
    x = torch.randn(3, 64)
    model(x)  # caches ‖w_i‖² of the dense weight
    quantize_base(model, "int8")
    layer = model[0]
    from lorakit.variants.dora import dora_linear_reference

    want = dora_linear_reference(
        x, layer.base.dequantize(), layer.base.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scaling
    )
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


# --- lorakit's NF4 dequantise (lorakit.variants.nf4): torchao's values exactly, in every mode ------------------

STORED = [torch.float32, torch.bfloat16, torch.float16, torch.float64]  # float64 takes the (256, 2) table path


@pytest.mark.parametrize("stored", STORED)
@pytest.mark.parametrize("shape", [(64, 64), (128, 320), (256, 1024)])  # scaler blocks of 64, 256 and 256
def test_nf4_dequantise_equals_torchaos_bit_for_bit(stored, shape):
    from lorakit.variants import nf4

    torch.manual_seed(0)
    q = NF4Linear(nn.Linear(shape[1], shape[0]).to(stored), False).weight  # an nn.Parameter, as layers hold it
    assert nf4.is_nf4(q) and q.dtype == stored
    for dtype in (None, torch.float32, torch.bfloat16, torch.float16, torch.float64):
        want = q.get_original_weight() if dtype is None else q.get_original_weight().to(dtype)
        got = NF4Linear.decode(q, dtype)
        assert type(got) is torch.Tensor and got.dtype == want.dtype and got.shape == shape
        assert torch.equal(got, want), f"stored {stored}, asked {dtype}: max |diff| {(got - want).abs().max()}"


def test_nf4_layer_matches_torchaos_dequantisation_in_every_mode():
    """The LoRA layer over an NF4 base against the reference formula on torchao's own dequantised weight:
    grad, no_grad, inference_mode, bf16 autocast, reentrant and non-reentrant checkpointing, deepcopy."""
    from torch.utils.checkpoint import checkpoint

    model = quantize_base(wrapped(), "nf4")
    layer = model[0]
    W = layer.base.weight.get_original_weight()  # torchao's path, not lorakit's
    x = torch.randn(6, 64, requires_grad=True)
    ref = ops.lora_linear_reference(x, W, layer.base.bias, layer.lora_A, layer.lora_B, layer.scaling)
    params = [x, layer.lora_A, layer.lora_B]
    want = torch.autograd.grad(ref.square().sum(), params)

    def grads(y):  # .backward(): a reentrant checkpoint refuses autograd.grad
        for t in params:
            t.grad = None
        y.square().sum().backward()
        return [t.grad for t in params]

    for name, run in {
        "grad": lambda: layer(x),
        "checkpoint": lambda: checkpoint(layer, x, use_reentrant=False),
        "checkpoint-reentrant": lambda: checkpoint(layer, x, use_reentrant=True),
        "deepcopy": lambda: copy.deepcopy(layer)(x),
    }.items():
        y = run()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5, msg=name)
        if name != "deepcopy":  # a copy's factors are other tensors
            for a, b in zip(grads(y), want, strict=False):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x.detach()), ref.detach(), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref_bf16 = ops.lora_linear_reference(
        x.bfloat16(),
        W.bfloat16(),
        layer.base.bias.bfloat16(),
        layer.lora_A.bfloat16(),
        layer.lora_B.bfloat16(),
        layer.scaling,
    )
    torch.testing.assert_close(y, ref_bf16, rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_variants_benchmark_profiles_the_nf4_dequantisation():
    """`benchmarks/variants.py --profile` (RESULTS-qlora.md's tables): one dequantisation per layer in forward and
    one per layer whose input needs a gradient in backward (the first layer's does not), on both paths."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "variants.py"
    for case in ("nf4", "nf4-torchao"):
        r = subprocess.run(
            [sys.executable, str(script), "--quick", "--threads", "1", "--profile", case],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert "dequantising NF4 in 3 calls" in r.stdout, r.stdout[-1500:]
