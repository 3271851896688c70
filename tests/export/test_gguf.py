"""The llama.cpp LoRA-adapter GGUF: read back with gguf's own reader, B·A per module against lorakit's merge."""

import copy
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import lorakit as lk
from lorakit.export.gguf_adapter import GgufExportError, write_gguf_adapter
from lorakit.files import safetensors

sys.path.insert(0, str(Path(__file__).parent.parent))
from _tiny_models import llama  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
N_HEAD, N_KV_HEAD = 4, 2  # _tiny_models.llama


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows of q/k to GGML's interleaved RoPE order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def randomise_lora(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def saved(tmp_path, config, targets=LLAMA_ALL, tie=False, **kw):
    """(base model dir, adapter dir, lorakit's delta W per module) for a random adapter on the tiny Llama."""
    base = llama(tie_word_embeddings=tie)
    base.save_pretrained(tmp_path / "base")
    model = randomise_lora(lk.apply_lora(copy.deepcopy(base), config, targets, **kw))
    lk.save_adapters(model, tmp_path / "adapter")
    merged = dict(lk.merge(model).named_parameters())
    deltas = {
        n.removesuffix(".weight"): (merged[n] - p).detach().double()
        for n, p in base.named_parameters()
        if not torch.equal(merged[n], p)
    }
    return tmp_path / "base", tmp_path / "adapter", deltas


def read(path):
    """(metadata {key: value}, tensors {name: numpy array in numpy's (rows, cols) order}) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = f.contents()
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)  # F32/F16 as they are, BF16 bytes decoded
        assert [int(d) for d in t.shape] == list(reversed(data.shape))  # GGML's ne is numpy's shape reversed
        tensors[t.name] = np.asarray(data, dtype=np.float64)
    return meta, tensors


def gguf_delta(meta, tensors, name):
    """What llama.cpp adds to a weight: (alpha / r) · B A, r = lora_b's ne[0] (llama-adapter.h get_scale)."""
    a, b = tensors[f"{name}.weight.lora_a"], tensors[f"{name}.weight.lora_b"]
    alpha = meta["adapter.lora.alpha"]
    return (alpha / b.shape[1]) * (b @ a) if alpha else b @ a


def expected(deltas, module):
    """lorakit's delta W in llama.cpp's row order (q/k permuted as its base weights are)."""
    d = deltas[module].numpy()
    if module.endswith("q_proj"):
        return llama_cpp_permute(d, N_HEAD)
    if module.endswith("k_proj"):
        return llama_cpp_permute(d, N_KV_HEAD)
    return d


def gguf_name(module):
    parts = module.split(".")
    if module == "lm_head":
        return "output"
    return f"blk.{parts[2]}.{GGUF_NAMES[parts[-1]]}"


CASES = {
    "plain": lk.LoraConfig(rank=4, alpha=8),
    "rslora": lk.LoraConfig(rank=4, alpha=8, use_rslora=True),
    "patterns": lk.LoraConfig(
        rank=2,
        alpha=4,
        rank_pattern={"layers.1.self_attn.q_proj": 6, "down_proj": 3},
        alpha_pattern={"v_proj": 3, "layers.0.mlp.up_proj": 16},
    ),
    "rslora+patterns": lk.LoraConfig(
        rank=4, alpha=2, use_rslora=True, rank_pattern={"k_proj": 8}, alpha_pattern={"o_proj": 5}
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_adapter_gguf_layout_and_delta_w(case, tmp_path):
    config = CASES[case]
    base, adapter, deltas = saved(tmp_path, config)
    report = write_gguf_adapter(adapter, base, tmp_path / "a.gguf")
    meta, tensors = read(tmp_path / "a.gguf")
    assert meta["general.architecture"] == "llama"
    assert meta["general.type"] == "adapter"
    assert meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(config.alpha)
    assert len(deltas) == 14
    assert sorted(tensors) == sorted(f"{gguf_name(m)}.weight.lora_{x}" for m in deltas for x in "ab")
    for module, delta in deltas.items():
        name = gguf_name(module)
        rank = config.for_module(module).rank
        a, b = tensors[f"{name}.weight.lora_a"], tensors[f"{name}.weight.lora_b"]
        assert a.shape == (rank, delta.shape[1]) and b.shape == (delta.shape[0], rank), module
        np.testing.assert_allclose(
            gguf_delta(meta, tensors, name), expected(deltas, module), atol=1e-6, rtol=0, err_msg=module
        )
    assert bool(report.folded) == (case != "plain")  # only what needed it was rescaled


def test_plain_adapter_b_is_written_as_stored(tmp_path):
    """Without rsLoRA or patterns, lora_b is PEFT's B untouched (bar the q/k RoPE row order), as convert writes it."""
    base, adapter, _ = saved(tmp_path, lk.LoraConfig(rank=4, alpha=8), ["v_proj", "q_proj"])
    write_gguf_adapter(adapter, base, tmp_path / "a.gguf")
    _, tensors = read(tmp_path / "a.gguf")
    stored, _ = safetensors.read(adapter / "adapter_model.safetensors")
    v_b = stored["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].double().numpy()
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight.lora_b"], v_b)
    q_b = stored["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].double().numpy()
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight.lora_b"], llama_cpp_permute(q_b, N_HEAD))


def test_lm_head_lora_is_llama_cpp_output(tmp_path):
    base, adapter, deltas = saved(tmp_path, lk.LoraConfig(rank=2, alpha=4), ["lm_head"])
    write_gguf_adapter(adapter, base, tmp_path / "a.gguf")
    meta, tensors = read(tmp_path / "a.gguf")
    assert sorted(tensors) == ["output.weight.lora_a", "output.weight.lora_b"]
    np.testing.assert_allclose(gguf_delta(meta, tensors, "output"), deltas["lm_head"].numpy(), atol=1e-6, rtol=0)


def test_embedding_lora_is_token_embd_with_a_transposed(tmp_path):
    """llama.cpp adds b · lora_a[token] to a token's embedding row (llm_build_inp_embd), lora_a (vocab, r)."""
    config = lk.LoraConfig(rank=3, alpha=2, use_rslora=True)
    base, adapter, deltas = saved(tmp_path, config, ["embed_tokens", "v_proj"])
    write_gguf_adapter(adapter, base, tmp_path / "a.gguf")
    meta, tensors = read(tmp_path / "a.gguf")
    a, b = tensors["token_embd.weight.lora_a"], tensors["token_embd.weight.lora_b"]
    assert a.shape == (100, 3) and b.shape == (32, 3)
    rows = (meta["adapter.lora.alpha"] / b.shape[1]) * (a @ b.T)  # row t: scale · b @ a[t]
    np.testing.assert_allclose(rows, deltas["model.embed_tokens"].numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype,tol", [("f16", 2e-3), ("bf16", 1.6e-2)])
def test_half_dtypes(dtype, tol, tmp_path):
    base, adapter, deltas = saved(tmp_path, CASES["patterns"])
    write_gguf_adapter(adapter, base, tmp_path / "a.gguf", dtype=dtype)
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert {t.tensor_type.name for t in reader.tensors} == {dtype.upper()}
    meta, tensors = read(tmp_path / "a.gguf")
    for module in deltas:
        want = expected(deltas, module)
        got = gguf_delta(meta, tensors, gguf_name(module))
        assert np.abs(got - want).max() <= tol * np.abs(want).max(), module


@pytest.mark.parametrize(
    "what,kw,tie,message",
    [
        ("dora", dict(config=lk.LoraConfig(rank=2, use_dora=True)), False, "no DoRA"),
        ("modules_to_save", dict(modules_to_save=["lm_head"]), False, "modules_to_save"),
        ("tied lm_head", dict(targets=["lm_head"]), True, "ties lm_head"),
    ],
)
def test_refused_with_reason_and_nothing_written(what, kw, tie, message, tmp_path):
    kw = dict(kw)
    config, targets = kw.pop("config", lk.LoraConfig(rank=2)), kw.pop("targets", ["q_proj"])
    base, adapter, _ = saved(tmp_path, config, targets, tie=tie, **kw)
    out = tmp_path / "a.gguf"
    with pytest.raises(GgufExportError, match=message):
        write_gguf_adapter(adapter, base, out)
    assert not out.exists() and list(tmp_path.glob("*.gguf*")) == []


def test_trained_bias_refused(tmp_path):
    """PEFT's bias="lora_only" saves the wrapped layers' biases; a llama.cpp adapter has nowhere to put them."""
    base, adapter, _ = saved(tmp_path, lk.LoraConfig(rank=2), ["q_proj"])
    weights = adapter / "adapter_model.safetensors"
    tensors, _ = safetensors.read(weights)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"] = torch.ones(32)
    safetensors.write(weights, tensors)
    (adapter / "lorakit.json").unlink()  # as PEFT would write it: no lorakit.json (whose hashes this edit breaks)
    with pytest.raises(GgufExportError, match="q_proj.base_layer.bias.*only lora_A/lora_B pairs"):
        write_gguf_adapter(adapter, base, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_failed_export_leaves_an_existing_file_as_it_was(tmp_path):
    base, adapter, _ = saved(tmp_path, lk.LoraConfig(rank=2), ["q_proj"])
    out = tmp_path / "a.gguf"
    out.write_bytes(b"previous")
    with pytest.raises(GgufExportError, match="dtype 'q4'"):
        write_gguf_adapter(adapter, base, out, dtype="q4")
    assert out.read_bytes() == b"previous"


def test_adapter_for_another_model_refused(tmp_path):
    base, adapter, _ = saved(tmp_path, lk.LoraConfig(rank=2), ["gate_proj"])
    cfg = (base / "config.json").read_text().replace('"intermediate_size": 64', '"intermediate_size": 48')
    (base / "config.json").write_text(cfg)
    with pytest.raises(GgufExportError, match=r"gate_proj.*\(64, 32\) weight.*\(48, 32\).*another model"):
        write_gguf_adapter(adapter, base, tmp_path / "a.gguf")


def test_non_llama_base_refused(tmp_path):
    base, adapter, _ = saved(tmp_path, lk.LoraConfig(rank=2), ["q_proj"])
    cfg = (base / "config.json").read_text().replace("LlamaForCausalLM", "GPT2LMHeadModel")
    (base / "config.json").write_text(cfg)
    with pytest.raises(GgufExportError, match="GPT2LMHeadModel"):
        write_gguf_adapter(adapter, base, tmp_path / "a.gguf")
