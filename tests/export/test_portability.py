"""`lorakit inspect --target`: the portability report on real adapters saved by lorakit from tiny transformers
models."""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

import lorakit as lk
from lorakit.cli import inspect as inspect_command
from lorakit.export import portability as port

sys.path.insert(0, str(Path(__file__).parent.parent))
from _tiny_models import gpt2, llama  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

QV = ["q_proj", "v_proj"]


def saved(tmp_path: Path, name: str, model: nn.Module, config: lk.LoraConfig, targets, **kw) -> Path:
    return lk.save_adapters(lk.apply_lora(model, config, targets, **kw), tmp_path / name)


def by_target(found: dict[str, list[port.Finding]]) -> dict[str, dict[str, port.Finding]]:
    """{target: {severity: the first finding of that severity}}."""
    return {t: {f.severity: f for f in reversed(fs)} for t, fs in found.items()}


def verdicts(found: dict[str, list[port.Finding]]) -> dict[str, str]:
    return {t: port.verdict(fs) for t, fs in found.items()}


def test_plain_rank_8_qv_lora_is_fine_everywhere(tmp_path):
    found = port.report(saved(tmp_path, "plain", llama(), lk.LoraConfig(rank=8, alpha=16), QV))
    assert verdicts(found) == dict.fromkeys(port.TARGETS, "fine")
    assert all(len(fs) == 1 and fs[0].concerns == () for fs in found.values())
    assert "PeftModel.from_pretrained" in found["peft"][0].behaviour


def test_dora_is_refused_by_vllm_and_llama_cpp_and_merged_exactly_for_onnx(tmp_path):
    found = port.report(saved(tmp_path, "dora", llama(), lk.LoraConfig(rank=4, alpha=8, use_dora=True), QV))
    assert verdicts(found) == {"vllm": "refused", "llama.cpp": "refused", "onnx": "fine", "peft": "fine"}
    vllm, cpp = found["vllm"][0], found["llama.cpp"][0]
    assert vllm.concerns == ("use_dora",) and "peft_helper.py" in vllm.source and "lorakit merge" in vllm.fix
    assert "convert_lora_to_gguf.py" in cpp.source and cpp.fix.startswith("lorakit export --format gguf ")
    assert found["onnx"][0].concerns == ("use_dora",) and "--format onnx" in found["onnx"][0].fix


def test_modules_to_save_lm_head_is_refused_by_vllm_and_llama_cpp(tmp_path):
    found = port.report(saved(tmp_path, "mts", llama(), lk.LoraConfig(rank=4), QV, modules_to_save=["lm_head"]))
    assert verdicts(found) == {"vllm": "refused", "llama.cpp": "refused", "onnx": "fine", "peft": "fine"}
    for target in ("vllm", "llama.cpp", "onnx"):
        assert found[target][0].concerns == ("modules_to_save", "lm_head")
    assert "--format gguf " in found["llama.cpp"][0].fix


def test_a_classification_head_in_modules_to_save_is_fine_for_vllm_releases_that_load_it(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    base = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_labels=3,
        )
    )
    found = port.report(saved(tmp_path, "cls", base, lk.LoraConfig(rank=4), QV, modules_to_save=["score"]))
    assert verdicts(found)["vllm"] == "fine" and "53555" in found["vllm"][0].source
    assert verdicts(found)["llama.cpp"] == "refused"


def test_rslora_and_alpha_pattern_differ_in_llama_cpp_by_the_scale_it_computes(tmp_path):
    config = lk.LoraConfig(rank=4, alpha=8, use_rslora=True, alpha_pattern={"v_proj": 32})
    found = port.report(saved(tmp_path, "rs", llama(), config, QV))
    assert verdicts(found) == {"vllm": "differs", "llama.cpp": "differs", "onnx": "fine", "peft": "fine"}
    cpp = found["llama.cpp"][0]
    # llama.cpp: one alpha / rank = 8 / 4 for every module; lorakit: 8 / sqrt(4) (q) and 32 / sqrt(4) (v)
    assert cpp.concerns[:2] == ("use_rslora", "alpha_pattern") and len(cpp.concerns) == 2 + 4
    assert "get 2 instead of 4" in cpp.behaviour and "--format gguf-adapter" in cpp.fix
    vllm = found["vllm"][0]  # lora_alpha / sqrt(r) = 4 is right for q_proj, not for v_proj (16)
    assert vllm.concerns == ("alpha_pattern", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj")
    assert "by 4 instead of 16" in vllm.behaviour


def test_rslora_alone_is_fine_in_vllm_and_differs_in_llama_cpp(tmp_path):
    found = port.report(saved(tmp_path, "rs", llama(), lk.LoraConfig(rank=4, alpha=8, use_rslora=True), QV))
    assert verdicts(found)["vllm"] == "fine" and found["vllm"][0].concerns == ("use_rslora",)
    assert verdicts(found)["llama.cpp"] == "differs"


def test_rank_pattern_alone_is_exact_in_llama_cpp(tmp_path):
    """llama.cpp divides the one alpha by each module's own rank, so rank_pattern alone is computed right."""
    config = lk.LoraConfig(rank=4, alpha=8, rank_pattern={"v_proj": 8})
    found = port.report(saved(tmp_path, "rp", llama(), config, QV))
    assert verdicts(found) == {"vllm": "differs", "llama.cpp": "fine", "onnx": "fine", "peft": "fine"}
    assert "by 2 instead of 1" in found["vllm"][0].behaviour


@pytest.mark.parametrize("rank,flag", [(64, 64), (20, 32)])
def test_rank_over_16_needs_vllm_max_lora_rank(tmp_path, rank, flag):
    found = port.report(saved(tmp_path, "big", llama(), lk.LoraConfig(rank=rank, alpha=rank), QV))
    assert verdicts(found) == {"vllm": "refused", "llama.cpp": "fine", "onnx": "fine", "peft": "fine"}
    assert f"--max-lora-rank {flag}" in found["vllm"][0].fix and "config/lora.py" in found["vllm"][0].source
    assert len(found["vllm"][0].concerns) == 4  # q and v of both layers


def test_conv_lora_is_refused_by_vllm_and_llama_cpp(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv1d(8, 8, 1))
    found = port.report(saved(tmp_path, "conv", model, lk.LoraConfig(rank=2), ["0", "1"]))
    assert verdicts(found) == {"vllm": "refused", "llama.cpp": "refused", "onnx": "fine", "peft": "fine"}
    assert found["llama.cpp"][0].concerns == ("0", "1") and found["llama.cpp"][0].fix == "none"


def test_lora_biases_are_refused_by_vllm_and_llama_cpp(tmp_path):
    found = port.report(saved(tmp_path, "bias", gpt2(), lk.LoraConfig(rank=2, bias="all"), ["c_attn"]))
    assert verdicts(found)["vllm"] == "refused" and verdicts(found)["llama.cpp"] == "refused"
    assert found["llama.cpp"][0].concerns == ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn")


def test_lm_head_lora_on_a_tied_model_is_refused_by_llama_cpp_once_model_is_given(tmp_path):
    model = llama(tie_word_embeddings=True)
    adapter = saved(tmp_path, "emb", model, lk.LoraConfig(rank=4), ["embed_tokens", "lm_head", "q_proj"])
    model.config.architectures = ["LlamaForCausalLM"]  # what save_pretrained records
    model.config.save_pretrained(tmp_path / "base")
    unchecked = port.report(adapter)
    assert verdicts(unchecked)["llama.cpp"] == "fine" and "pass --model" in unchecked["llama.cpp"][0].behaviour
    assert verdicts(unchecked)["vllm"] == "fine" and "embedding_modules" in unchecked["vllm"][0].behaviour
    found = port.report(adapter, ["llama.cpp"], tmp_path / "base")
    assert list(found) == ["llama.cpp"] and verdicts(found) == {"llama.cpp": "refused"}
    assert [f.concerns for f in found["llama.cpp"]] == [("lm_head",)] and "9065" in found["llama.cpp"][0].source


def test_a_base_lorakit_does_not_write_to_gguf_is_reported_with_model(tmp_path):
    model = gpt2()
    adapter = saved(tmp_path, "g", model, lk.LoraConfig(rank=4), ["c_attn"])
    model.config.architectures = ["GPT2LMHeadModel"]
    model.config.save_pretrained(tmp_path / "base")
    found = port.report(adapter, ["llama.cpp", "onnx"], tmp_path / "base")
    assert found["llama.cpp"][0].concerns == ("architectures=GPT2LMHeadModel",)
    assert verdicts(found) == {"llama.cpp": "refused", "onnx": "fine"}


def test_lorakit_only_config_keys_are_named_for_peft(tmp_path):
    adapter = saved(tmp_path, "k", llama(), lk.LoraConfig(rank=4), QV)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lorakit": {"base": "x"}}))
    peft_findings = port.report(adapter, ["peft"])["peft"]
    assert [f.concerns for f in peft_findings] == [("lorakit",)] and "peft/config.py" in peft_findings[0].source


def test_every_rule_cites_a_source_and_names_a_fix_and_the_cli_offers_every_target():
    for rule, (target, severity, behaviour, fix, source) in port.RULES.items():
        assert target in (*port.ALL_TARGETS, "*") and severity in port.SEVERITIES, rule
        assert behaviour.endswith(".") and fix and re.search(r"https://|lorakit ", source), rule
    assert set(port.ALL_FINE) == set(port.ALL_TARGETS)
    parser = argparse.ArgumentParser()
    inspect_command.add_inspect(parser.add_subparsers())
    for target in port.ALL_TARGETS:  # the CLI's --target choices are the report's targets
        assert parser.parse_args(["inspect", "a", "--target", target]).target == [target]


def test_unknown_target_and_missing_model_config_are_errors(tmp_path):
    adapter = saved(tmp_path, "a", llama(), lk.LoraConfig(rank=4), QV)
    with pytest.raises(ValueError, match="unknown target"):
        port.report(adapter, ["tensorrt"])
    with pytest.raises(lk.LoraFileError, match="config.json"):
        port.report(adapter, ["vllm"], tmp_path / "nowhere")


def lorakit(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_cli_inspect_target_text_and_json(tmp_path):
    adapter = saved(tmp_path, "dora", llama(), lk.LoraConfig(rank=32, alpha=8, use_dora=True), QV)
    r = lorakit("inspect", adapter, "--target", "vllm", "--target", "llama.cpp")
    assert r.returncode == 0, r.stderr
    assert "portability: vllm: refused" in r.stdout and "portability: llama.cpp: refused" in r.stdout
    assert "--max-lora-rank 32" in r.stdout and "portability: onnx" not in r.stdout
    assert "4 LoRA modules" in r.stdout  # inspect's own description comes first, as without --target

    r = lorakit("inspect", adapter, "--target", "onnx", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert list(info["portability"]) == ["onnx"] and info["modules"]
    (finding,) = info["portability"]["onnx"]
    assert finding == {**finding, "target": "onnx", "severity": "fine", "concerns": ["use_dora"]}
    assert math.isclose(info["modules"][0]["scaling"], 8 / 32)

    plain = lorakit("inspect", adapter, "--json")
    assert "portability" not in json.loads(plain.stdout)


@pytest.mark.parametrize(
    "args,says",
    [
        (["--model", "nowhere"], "nowhere: no such directory"),  # --model alone: the provenance check (issue 17)
        (["--target", "tensorrt"], "invalid choice"),
        (["--target", "vllm", "--model", "nowhere"], "nowhere: no such directory"),
    ],
)
def test_cli_bad_target_flags_exit_2(tmp_path, args, says):
    adapter = saved(tmp_path, "a", llama(), lk.LoraConfig(rank=4), QV)
    r = lorakit("inspect", adapter, *args)
    assert r.returncode == 2 and says in r.stderr, (r.returncode, r.stderr)
