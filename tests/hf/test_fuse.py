"""fuse_frozen_blocks on real tiny transformers models with LoRA: same loss and LoRA gradients as unfused (1e-6),
same state_dict keys and adapter bytes, gradient checkpointing exact, RoPE swapped per instance only, and the
listed transformers classes still Llama's formula."""

import copy
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.llama import modeling_llama

import lorakit as lk
from lorakit.fused import rotary
from lorakit.hf import checkpointing, speed
from lorakit.hf.fuse import ATTENTIONS, MLPS, RMSNORMS, FusedRMSNorm, FusedSwiGLU, fuse_frozen_blocks, resolve_fuse
from lorakit.train.config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _tiny_models  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _model(kind):
    """A tiny Llama or Qwen3 with LoRA (random B, so every LoRA factor gets a gradient), in train mode."""
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SIZES, vocab_size=128))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**SIZES, head_dim=16, vocab_size=128))
    lk.apply_lora(model, lk.LoraConfig(rank=4, alpha=8.0), targets=TARGETS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def pair(request):
    """(unfused, fused) copies of the same LoRA model, and what was fused."""
    plain = _model(request.param)
    fused = copy.deepcopy(plain)
    return plain, fused, fuse_frozen_blocks(fused)


def _batch():
    torch.manual_seed(5)
    ids = torch.randint(0, 128, (2, 11))
    return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def _loss_and_grads(model):
    model.zero_grad()
    loss = model(**_batch()).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_fused_what_it_should(pair):
    plain, fused, names = pair
    layers = plain.config.num_hidden_layers
    norms_per_layer = 4 if isinstance(plain, Qwen3ForCausalLM) else 2  # Qwen3's q_norm / k_norm too
    assert sum(n.endswith(":rotary") for n in names) == layers
    assert sum(isinstance(m, FusedSwiGLU) for m in fused.modules()) == layers
    assert sum(isinstance(m, FusedRMSNorm) for m in fused.modules()) == layers * norms_per_layer + 1
    assert len(names) == layers * (2 + norms_per_layer) + 1
    assert fuse_frozen_blocks(fused) == []  # idempotent
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert isinstance(fused.model.layers[0].mlp.gate_proj, type(plain.model.layers[0].mlp.gate_proj))


def test_same_loss_and_lora_gradients(pair):
    plain, fused, _ = pair
    (loss_p, grads_p), (loss_f, grads_f) = _loss_and_grads(plain), _loss_and_grads(fused)
    _close(loss_f, loss_p)
    assert grads_f.keys() == grads_p.keys()
    for name in grads_p:
        _close(grads_f[name], grads_p[name])


def _grad_fn_names(t):
    """The class names of every node of t's autograd graph."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


def test_fused_ops_are_the_ones_running(pair):
    plain, fused, _ = pair
    fused_names = _grad_fn_names(fused(**_batch()).loss)
    assert {"_RMSNormBackward", "_SwiGLUBackward", "_RotaryBackward"} <= fused_names
    assert not any("Rotary" in n or "RMSNorm" in n for n in _grad_fn_names(plain(**_batch()).loss))  # per instance


def test_survives_transformers_kernelize_on_train_and_eval(pair):
    plain, fused, _ = pair
    model = copy.deepcopy(fused)
    model.set_use_kernels(True)  # from_pretrained's default where `kernels` is installed: train()/eval() kernelize
    model.eval().train()
    assert "_RotaryBackward" in _grad_fn_names(model(**_batch()).loss)
    _close(_loss_and_grads(model)[0], _loss_and_grads(plain)[0])


def test_gradient_checkpointing_still_exact(pair):
    plain, fused, _ = pair
    expected = _loss_and_grads(plain)
    ckpt = copy.deepcopy(fused)
    checkpointing.enable(ckpt)  # as finetune turns it on
    loss, grads = _loss_and_grads(ckpt)
    _close(loss, expected[0])
    for name, g in expected[1].items():
        _close(grads[name], g)


def test_saved_adapter_is_byte_identical(tmp_path):
    model = _model("llama")
    lk.save_adapters(model, tmp_path / "before")
    fuse_frozen_blocks(model)
    lk.save_adapters(model, tmp_path / "after")
    for f in sorted(p.name for p in (tmp_path / "before").iterdir()):
        assert (tmp_path / "after" / f).read_bytes() == (tmp_path / "before" / f).read_bytes()


def test_unknown_models_left_alone():
    model = _tiny_models.gpt2()
    assert fuse_frozen_blocks(model) == []
    assert resolve_fuse("auto", model, TrainConfig(device="cpu")) is False
    with pytest.raises(ValueError, match="no block lorakit can fuse"):
        resolve_fuse("on", model, TrainConfig(device="cpu"))


def test_resolve_fuse():
    model = _tiny_models.llama()
    assert resolve_fuse("auto", model, TrainConfig(device="cpu")) is True
    assert resolve_fuse("on", model, TrainConfig(device="cpu")) is True
    assert resolve_fuse("off", model, TrainConfig(device="cpu")) is False
    assert fuse_frozen_blocks(model)  # resolving changes nothing


def _body(fn):
    return inspect.getsource(fn).split("\n", 1)[1]


def _module_of(class_name):
    family = class_name.removesuffix("RMSNorm").removesuffix("MLP").removesuffix("Attention")
    name = {"SmolLM3": "smollm3", "Qwen2Moe": "qwen2_moe", "Qwen3Moe": "qwen3_moe"}.get(family, family.lower())
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def test_listed_classes_are_llamas_formula():
    for name in sorted(RMSNORMS):
        assert _body(getattr(_module_of(name), name).forward) == _body(modeling_llama.LlamaRMSNorm.forward), name
    for name in sorted(MLPS):
        assert _body(getattr(_module_of(name), name).forward) == _body(modeling_llama.LlamaMLP.forward), name
    torch.manual_seed(6)
    q, k, cos, sin = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    for name in sorted(ATTENTIONS):
        for a, b in zip(_module_of(name).apply_rotary_pos_emb(q, k, cos, sin), rotary(q, k, cos, sin), strict=True):
            _close(a, b)


@pytest.mark.slow  # torch.compile of a decoder layer (aot_eager): ~10 s on a loaded 2-core machine
def test_compiled_fused_model_matches_eager():
    fused = _model("llama")
    fuse_frozen_blocks(fused)
    torch._dynamo.reset()
    expected = _loss_and_grads(fused)
    compiled = copy.deepcopy(fused)
    compiled.model.layers[0].compile(backend="aot_eager")
    loss, grads = _loss_and_grads(compiled)
    _close(loss, expected[0])
    for name, g in expected[1].items():
        _close(grads[name], g)


def test_finetune_speed_settings_fuse_the_model():
    model = _tiny_models.llama()
    for choice, want in (("off", False), ("auto", True), ("on", True)):
        resolved = speed.resolve(
            speed.SpeedConfig(fuse=choice), model, task="causal-lm", train=TrainConfig(device="cpu")
        )
        assert resolved.fuse is want and resolved.items()["fuse"] == {True: "on", False: "off"}[want]
    speed.apply(resolved, model)
    assert isinstance(model.model.norm, FusedRMSNorm) and isinstance(model.model.layers[1].mlp, FusedSwiGLU)


@pytest.mark.slow  # a subprocess
def test_benchmark_runs_quick(tmp_path):
    out = tmp_path / "RESULTS-fused.md"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "fused.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "Machine: " in text and "| fused |" in text and "| RoPE q, k (B, H, T, head) | bfloat16 |" in text
