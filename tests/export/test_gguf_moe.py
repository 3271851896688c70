"""Mixture-of-experts models as merged GGUF: Qwen3-MoE ("qwen3moe") and Mixtral ("llama" with experts), proven in
llama.cpp (llama-cpp-python) as the Llama exports are, and the MoE kinds llama.cpp would compute otherwise refused."""

import json
import sys
from pathlib import Path

import llama_cpp  # noqa: F401  (the export extra: a missing runtime fails here, never skips)
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit as lk
from lorakit.cli import main
from lorakit.export import gguf
from lorakit.export.gguf_adapter import GgufExportError
from lorakit.export.gguf_model import write_gguf_model

sys.path.insert(0, str(Path(__file__).parent))
from _moe_gguf_models import EXPERTS, TOP_K, save_bpe_moe  # noqa: E402
from test_gguf_model import read  # noqa: E402

pytestmark = pytest.mark.slow  # export runtimes: not in the fast set

FAMILIES = ("qwen3_moe", "mixtral")


def _adapter(base_dir, out):
    """A module-level LoRA on attention, randomised (B nonzero), saved to `out`: the merge is proven beside the
    experts."""
    model = lk.apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), lk.LoraConfig(rank=4, alpha=8), ["q_proj"])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lk.save_adapters(model, out)
    return out


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """{family: (base dir, adapter dir)} for the tiny Qwen3-MoE and Mixtral."""
    root = tmp_path_factory.mktemp("gguf-moe")
    return {f: (save_bpe_moe(f, root / f), _adapter(root / f, root / f"{f}-adapter")) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_are_stacked_as_llama_cpp_reads_them_from_either_checkpoint_layout(moe, family, tmp_path):
    """Per-expert 2-D weights (what save_pretrained writes) and transformers' fused 3-D parameters (a state_dict
    saved as is) give the same GGUF: gate and up split from gate_up_proj (E, 2I, H), down_proj (E, H, I)."""
    base_dir, _ = moe[family]
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    write_gguf_model(base_dir, tmp_path / "m.gguf", dtype="f32")
    meta, tensors = read(tmp_path / "m.gguf")
    arch = "qwen3moe" if family == "qwen3_moe" else "llama"
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.expert_count"] == EXPERTS and meta[f"{arch}.expert_used_count"] == TOP_K
    assert meta.get(f"{arch}.expert_feed_forward_length") == (16 if family == "qwen3_moe" else None)
    for i, layer in enumerate(model.model.layers):
        gate_up = layer.mlp.experts.gate_up_proj.detach().double().numpy()  # (E, 2I, H)
        inter = gate_up.shape[1] // 2
        np.testing.assert_array_equal(tensors[f"blk.{i}.ffn_gate_exps.weight"][0], gate_up[:, :inter])
        np.testing.assert_array_equal(tensors[f"blk.{i}.ffn_up_exps.weight"][0], gate_up[:, inter:])
        down = layer.mlp.experts.down_proj.detach().double().numpy()
        np.testing.assert_array_equal(tensors[f"blk.{i}.ffn_down_exps.weight"][0], down)
        router = layer.mlp.gate.weight.detach().double().numpy()
        np.testing.assert_array_equal(tensors[f"blk.{i}.ffn_gate_inp.weight"][0], router)
    fused = tmp_path / "fused"
    fused.mkdir()
    for f in base_dir.iterdir():
        if f.suffix != ".safetensors":
            (fused / f.name).write_bytes(f.read_bytes())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"))
    write_gguf_model(fused, tmp_path / "fused.gguf", dtype="f32")
    _, again = read(tmp_path / "fused.gguf")
    assert sorted(again) == sorted(tensors)
    for name, (data, _) in tensors.items():
        np.testing.assert_array_equal(again[name][0], data, err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_expert_lora_gguf_is_proven_in_llama_cpp(moe, family, tmp_path):
    """LoRA on every fused expert weight only (apply_lora target_parameters="all-experts"), merged and written as
    GGUF: llama.cpp computes what lorakit computes with the adapter unmerged, and the adapter's effect, all of it
    in the experts, is far beyond the tolerance."""
    base_dir, _ = moe[family]
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    lk.apply_lora(model, lk.LoraConfig(rank=4, alpha=8), target_parameters=["all-experts"])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    done = gguf.export_gguf(model, tok, "causal-lm", base_dir, [], tmp_path / "out", dtype="f32")
    (proof,) = done.proofs
    assert proof.passed and proof.what == "merged" and proof.tokenizer_agrees
    # measured 8.7e-7 (Qwen3-MoE) and 9.5e-7 (Mixtral); the expert LoRA moves the logits by 0.2 or more
    assert proof.max_abs_diff < 1e-5 and proof.argmax_agree == proof.positions
    assert proof.greedy_agree == proof.greedy_tokens == 40
    assert proof.adapter_effect > 0.1


def test_cli_refuses_gpt_oss_and_an_moe_adapter_gguf_before_loading_naming_what_is_supported(moe, tmp_path, capsys):
    base_dir, adapter = moe["qwen3_moe"]
    out = tmp_path / "out"
    args = ["export", "--model", str(base_dir), "--adapter", str(adapter), "--format", "gguf-adapter"]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a mixture-of-experts base" in err and "build_lora_mm_id" in err and "--format gguf" in err
    oss = tmp_path / "gpt-oss"
    oss.mkdir()
    for f in base_dir.iterdir():
        (oss / f.name).write_bytes(f.read_bytes())
    config = json.loads((base_dir / "config.json").read_text())
    (oss / "config.json").write_text(json.dumps({**config, "architectures": ["GptOssForCausalLM"]}))
    assert main(["export", "--model", str(oss), "--adapter", str(adapter), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "GptOssForCausalLM" in err and "mixture-of-experts family lorakit does not write" in err
    assert "Qwen3MoeForCausalLM" in err and "MixtralForCausalLM" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "change,message",
    [
        ({"norm_topk_prob": False}, "norm_topk_prob=false"),
        ({"mlp_only_layers": [1]}, "some layers are dense"),
        ({"decoder_sparse_step": 2}, "some layers are dense"),
    ],
)
def test_qwen3_moe_that_llama_cpp_computes_otherwise_is_refused_and_nothing_written(moe, change, message, tmp_path):
    base_dir, _ = moe["qwen3_moe"]
    other = tmp_path / "other"
    other.mkdir()
    for f in base_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((base_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(GgufExportError, match=message):
        write_gguf_model(other, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
