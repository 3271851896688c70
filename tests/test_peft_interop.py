"""Files both ways with the real PEFT package as the oracle, on tiny random transformers models."""

import copy
import json
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch

import lorakit as lk

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_models import gpt2, llama  # noqa: E402

IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(5))

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomise_lora(model):
    """Non-zero values in every LoRA factor, lorakit's or PEFT's, so the adapter changes the output."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def peft_load(base, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(directory)).eval()


@pytest.mark.parametrize(
    "make,targets",
    [
        (llama, "all-linear"),
        (llama, ["q_proj", "v_proj", "embed_tokens"]),
        (gpt2, ["c_attn", "c_proj", "c_fc"]),
        (gpt2, ["c_attn", "wte"]),
    ],
)
@pytest.mark.parametrize("rslora", [False, True])
def test_lorakit_adapter_loads_in_peft(make, targets, rslora, tmp_path):
    base = make()
    model = randomise_lora(
        lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=4, alpha=8, use_rslora=rslora), targets=targets)
    )
    want = logits(model)
    assert not torch.allclose(want, logits(base))
    lk.save_adapters(model, tmp_path)
    got = logits(peft_load(copy.deepcopy(base), tmp_path))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and lorakit's own loader on a bare base gives the same
    torch.testing.assert_close(logits(lk.load_adapters(copy.deepcopy(base), tmp_path)), want, rtol=1e-5, atol=1e-5)


def test_lorakit_per_module_ranks_and_bias_load_in_peft(tmp_path):
    base = llama()
    cfg = lk.LoraConfig(
        rank=2, alpha=4, bias="all", rank_pattern={"layers.1.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 3}
    )
    model = randomise_lora(lk.apply_lora(copy.deepcopy(base), cfg, targets=["q_proj", "v_proj"]))
    want = logits(model)
    lk.save_adapters(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 6}
    assert saved["alpha_pattern"] == {f"model.layers.{i}.self_attn.v_proj": 3.0 for i in range(2)}
    torch.testing.assert_close(logits(peft_load(copy.deepcopy(base), tmp_path)), want, rtol=1e-5, atol=1e-5)


def test_gpt2_trained_bias_round_trips_through_peft(tmp_path):
    base = gpt2()
    model = randomise_lora(lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=2, bias="all"), ["c_attn"]))
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.base.bias.add_(0.5)
    want = logits(model)
    lk.save_adapters(model, tmp_path)
    torch.testing.assert_close(logits(peft_load(copy.deepcopy(base), tmp_path)), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(lk.load_adapters(copy.deepcopy(base), tmp_path)), want, rtol=1e-5, atol=1e-5)


PEFT_CASES = {
    "llama-attn": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-rslora": (llama, dict(r=4, lora_alpha=16, target_modules=LLAMA_ALL, use_rslora=True)),
    "llama-patterns": (
        llama,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=LLAMA_ALL,
            rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2},
            alpha_pattern={"v_proj": 32},
        ),
    ),
    "llama-embed": (llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"])),
    "llama-regex": (llama, dict(r=2, lora_alpha=4, target_modules=r".*layers\.0\.self_attn\.(q|k)_proj")),
    "gpt2-conv1d": (gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2-embed": (gpt2, dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"], fan_in_fan_out=True)),
    "gpt2-bias-lora-only": (
        gpt2,
        dict(r=2, lora_alpha=4, target_modules=["c_attn"], bias="lora_only", fan_in_fan_out=True),
    ),
    "gpt2-bias-all": (gpt2, dict(r=2, lora_alpha=4, target_modules=["c_attn"], bias="all", fan_in_fan_out=True)),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_loads_in_lorakit(case, tmp_path):
    make, kwargs = PEFT_CASES[case]
    base = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = randomise_lora(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))).eval()
        if kwargs.get("bias") in ("all", "lora_only"):
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if p.requires_grad and n.endswith("bias"):
                        p.add_(0.25)
        pm.save_pretrained(str(tmp_path))
    want = logits(pm)
    assert not torch.allclose(want, logits(base))
    model = lk.load_adapters(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)
    # a second load into the now-wrapped model is the hot path: same result
    torch.testing.assert_close(logits(lk.load_adapters(model, tmp_path)), want, rtol=1e-5, atol=1e-5)
    # and merging what was loaded reproduces PEFT's output too
    torch.testing.assert_close(logits(lk.merge(model)), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "field,value",
    [
        ("use_qalora", True),
        ("layers_to_transform", [0]),
        ("init_lora_weights", "pissa"),
        ("lora_bias", True),
        ("layer_replication", [[0, 1]]),
        ("some_future_feature", {"x": 1}),
    ],
)
def test_unsupported_peft_features_refused_by_name(field, value, tmp_path):
    base = llama()
    model = randomise_lora(lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=2), ["q_proj"]))
    lk.save_adapters(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = copy.deepcopy(base)
    with pytest.raises(lk.LoraFileError, match=field):
        lk.load_adapters(fresh, tmp_path)
    assert not lk.lora_layers(fresh)


# -- modules_to_save on a tied head, PEFT's bias="all": both ways, PEFT as the oracle ---------------


def tied_llama():
    """The tiny Llama with lm_head tied to embed_tokens (tie_word_embeddings, as in many small Llamas)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def perturb_trainable(model, scale=0.25):
    """Every trainable tensor that is not a LoRA factor (a saved module's copy, biases) moved off its value."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def test_peft_modules_to_save_on_a_tied_head_trains_a_copy_both_ways(tmp_path):
    base = tied_llama()
    embeddings = base.model.embed_tokens.weight.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        )
    pm = perturb_trainable(randomise_lora(pm)).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    want = logits(pm)
    model = lk.load_adapters(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)  # the input embeddings are the base's
    # and back: lorakit's file loads in PEFT to the same logits
    lk.save_adapters(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    torch.testing.assert_close(logits(peft_load(copy.deepcopy(base), tmp_path / "ours")), want, rtol=1e-5, atol=1e-5)
    # the merged model is PEFT's merge_and_unload: an untied head, the base's embeddings
    merged = lk.merge(model)
    torch.testing.assert_close(logits(merged), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(merged.model.embed_tokens.weight, embeddings)


def test_lorakit_modules_to_save_on_a_tied_head_loads_in_peft(tmp_path):
    base = tied_llama()
    model = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=2, alpha=4), ["v_proj"], modules_to_save=["lm_head"])
    model = perturb_trainable(randomise_lora(model))
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    want = logits(model)
    lk.save_adapters(model, tmp_path)
    torch.testing.assert_close(logits(peft_load(copy.deepcopy(base), tmp_path)), want, rtol=1e-5, atol=1e-5)


def test_peft_bias_all_is_saved_back_whole(tmp_path):
    base = gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], bias="all", fan_in_fan_out=True),
        )
        pm = perturb_trainable(randomise_lora(pm)).eval()  # every bias of the model trains under PEFT's "all"
        pm.save_pretrained(str(tmp_path / "peft"))
    want = logits(pm)
    model = lk.load_adapters(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)
    lk.save_adapters(model, tmp_path / "ours")
    torch.testing.assert_close(logits(peft_load(copy.deepcopy(base), tmp_path / "ours")), want, rtol=1e-5, atol=1e-5)
    from safetensors.torch import load_file

    peft_keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == peft_keys  # all 13 biases, not 2
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["bias"] == "all"
    assert lk.lora_layers(model)["transformer.h.0.attn.c_attn"].config.bias is lk.LoraBias.MODEL


@pytest.mark.parametrize("ours,theirs", [("all", "lora_only"), ("model", "all")])
def test_lorakit_bias_modes_mean_what_peft_reads(ours, theirs, tmp_path):
    base = gpt2()
    model = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=2, bias=ours), ["c_attn"])
    trains = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert all(n.endswith("bias") for n in trains)
    assert len(trains) == (2 if ours == "all" else 13)  # c_attn's two, or every bias of the model
    model = perturb_trainable(randomise_lora(model))
    want = logits(model)
    lk.save_adapters(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["bias"] == theirs
    torch.testing.assert_close(logits(peft_load(copy.deepcopy(base), tmp_path)), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(lk.load_adapters(copy.deepcopy(base), tmp_path)), want, rtol=1e-5, atol=1e-5)
