"""PiSSA and OLoRA inits: PEFT's factors and residual, exact at start, saved adapters usable on the ORIGINAL base."""

import copy
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import lorakit as lk
from lorakit.variants.base_init import base_init

INITS = ["pissa", "olora"]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))


def train_a_little(model):
    """Move A and B off their init, as training would."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def peft_model(base, init, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=init, **kw),
        )


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rslora", [False, True])
def test_factors_and_residual_equal_peft_and_the_layer_is_exact_at_start(init, rslora):
    base = mlp()
    ours = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=4, alpha=8, init=init, use_rslora=rslora), ["0", "2"])
    theirs = dict(peft_model(base, init, use_rslora=rslora).named_parameters())
    for m in ("0", "2"):
        layer = ours.get_submodule(m)
        for ours_t, key in (
            (layer.lora_A, "lora_A.default.weight"),
            (layer.lora_B, "lora_B.default.weight"),
            (layer.base.weight, "base_layer.weight"),
        ):
            torch.testing.assert_close(ours_t, theirs[f"base_model.model.{m}.{key}"], rtol=1e-5, atol=1e-6)
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), base(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("dora", [False, True])
def test_saved_adapter_is_a_rank_2r_lora_for_the_original_base(init, dora, tmp_path):
    base = mlp()
    model = train_a_little(
        lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=4, alpha=8, init=init, use_dora=dora), ["0", "2"])
    )
    x = torch.randn(5, 16)
    with torch.no_grad():
        y = model(x)
        lk.save_adapters(model, tmp_path)
        saved = lk.read_adapter_config(tmp_path)
        assert saved.config.rank == 8 and saved.config.init == "kaiming" and saved.raw["init_lora_weights"] is True
        assert saved.config.scaling == model[0].scaling
        fresh = lk.load_adapters(copy.deepcopy(base), tmp_path)  # the ORIGINAL base
        torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
        torch.testing.assert_close(theirs(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lk.merge(model)(x), y, rtol=1e-5, atol=1e-5)  # merge: residual + s·B A


def test_gpt2_conv1d_and_layer_files(tmp_path):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50, n_positions=16)).eval()
    ids = torch.randint(0, 50, (2, 6))
    model = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=4, alpha=8, init="pissa"), ["c_attn", "c_fc"])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-4, atol=1e-5)
        train_a_little(model)
        y = model(ids).logits
        lk.save_adapters(model, tmp_path / "dir")
        torch.testing.assert_close(
            lk.load_adapters(copy.deepcopy(base), tmp_path / "dir")(ids).logits, y, rtol=1e-4, atol=1e-5
        )
    layer = model.transformer.h[0].attn.c_attn
    layer.save_adapter(tmp_path / "one")
    orig = copy.deepcopy(base.transformer.h[0].attn.c_attn)
    plain = lk.with_lora(orig, lk.LoraConfig(rank=8, alpha=16)).load_adapter(tmp_path / "one")
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), layer(x), rtol=1e-5, atol=1e-5)


def test_refusals():
    with pytest.raises(TypeError, match="linear"):
        lk.with_lora(nn.Embedding(10, 8), lk.LoraConfig(rank=2, init="pissa"))
    with pytest.raises(ValueError, match="rank <= min"):
        lk.with_lora(nn.Linear(4, 3), lk.LoraConfig(rank=4, init="olora"))
    layer = lk.with_lora(nn.Linear(8, 8), lk.LoraConfig(rank=2, init="pissa"))
    with pytest.raises(ValueError, match="PiSSA/OLoRA"):
        layer.adapters.add("other", lk.LoraConfig(rank=2))
    plain = lk.with_lora(nn.Linear(8, 8), lk.LoraConfig(rank=2))
    with pytest.raises(ValueError, match="PiSSA/OLoRA"):
        plain.adapters.add("other", lk.LoraConfig(rank=2, init="olora"))


def test_quantising_the_residual_keeps_the_error_small():
    """The PiSSA + QLoRA recipe: the principal part stays in full precision, the residual is quantised."""
    pytest.importorskip("torchao")
    from lorakit.variants.quant import quantize_base

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(128, 128))
    with torch.no_grad():  # a weight with a strong low-rank part, as pretrained weights have
        base[0].weight.add_(torch.randn(128, 4) @ torch.randn(4, 128))
    x = torch.randn(16, 128)
    err = {}
    for init in ("kaiming", "pissa"):
        m = quantize_base(lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=8, init=init), ["0"]), "nf4")
        with torch.no_grad():
            err[init] = ((m(x) - base(x)).norm() / base(x).norm()).item()
    assert err["pissa"] < 0.5 * err["kaiming"]


def test_base_init_math():
    W = torch.randn(10, 6)
    for init in INITS:
        A, B, R = base_init(W, 3, 0.5, init, torch.float32)
        torch.testing.assert_close(R + 0.5 * B @ A, W, rtol=1e-5, atol=1e-5)
