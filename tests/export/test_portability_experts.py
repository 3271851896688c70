"""`lorakit inspect --target`: expert adapters (PEFT `target_parameters` on fused 3-D experts) per runtime, on an
adapter PEFT itself saved for a tiny Qwen3-MoE."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from lorakit.cli import main
from lorakit.export import portability as port

sys.path.insert(0, str(Path(__file__).parent))
from _moe_gguf_models import EXPERTS, save_bpe_moe  # noqa: E402

pytestmark = pytest.mark.slow  # builds a model and runs PEFT: not in the fast set

RANK = 8  # E·r = 32 rows in lora_A: over vLLM's default --max-lora-rank 16 if read as the rank


@pytest.fixture(scope="module")
def peft_experts(tmp_path_factory):
    """(base dir, adapter dir): PEFT's LoRA on q_proj and on every layer's fused gate_up_proj and down_proj."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("portability-experts")
    base = save_bpe_moe("qwen3_moe", root / "base")
    config = LoraConfig(
        r=RANK,
        lora_alpha=16,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(root / "adapter")
    return base, root / "adapter"


def _with_config(adapter: Path, out: Path, **change) -> Path:
    """A copy of `adapter` whose adapter_config.json has `change` (a None value removes the key)."""
    out.mkdir()
    for f in adapter.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    config = {**json.loads((adapter / "adapter_config.json").read_text()), **change}
    (out / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return out


def test_each_runtime_says_whether_it_reads_expert_adapters_and_in_which_layout(peft_experts):
    base, adapter = peft_experts
    found = port.report(adapter, port.ALL_TARGETS, base)
    verdicts = {t: port.verdict(f) for t, f in found.items()}
    assert verdicts == {"vllm": "differs", "llama.cpp": "refused", "onnx": "fine", "peft": "fine", "sglang": "differs"}
    (vllm,) = found["vllm"]  # the rank is r = 8, not lora_A's E·r = 32 rows: no --max-lora-rank finding
    # two adapted parameters per layer, named as files.inspect names them (PEFT's `.base_layer` nesting)
    owners = [re.sub(r"\.base_layer$| \(nested 1\)$", "", m) for m in vllm.concerns[1:]]
    assert vllm.concerns[0] == "target_parameters" and len(set(vllm.concerns[1:])) == 4
    assert sorted(owners) == [f"model.layers.{i}.mlp.experts" for i in range(2) for _ in range(2)]
    assert "vllm#41384" in vllm.behaviour and "vllm#52198" in vllm.behaviour and "PEFT >= 0.19" in vllm.behaviour
    assert "pull/41384" in vllm.source and "lorakit merge" in vllm.fix
    (sglang,) = found["sglang"]
    assert "skipped" in sglang.behaviour and "sglang#25528" in sglang.behaviour
    assert any("build_lora_mm_id" in f.behaviour for f in found["llama.cpp"])
    assert all("--format gguf" in f.fix for f in found["llama.cpp"])
    assert "PEFT >= 0.19 loads the expert factors" in found["peft"][0].behaviour
    assert EXPERTS * RANK > 16  # what the rank rule would have read without the expert count


def test_the_pre_019_layout_is_refused_for_peft_and_an_unversioned_one_is_flagged(peft_experts, tmp_path):
    _, adapter = peft_experts
    old = _with_config(adapter, tmp_path / "old", peft_version="0.18.1")
    (peft,) = port.report(old, ["peft"])["peft"]
    assert peft.severity == "refused" and "PEFT <= 0.18" in peft.behaviour and "load_adapters" in peft.fix
    unknown = _with_config(adapter, tmp_path / "unknown", peft_version=None)
    (peft,) = port.report(unknown, ["peft"])["peft"]
    assert peft.severity == "differs" and "no peft_version" in peft.behaviour
    (vllm,) = port.report(unknown, ["vllm"])["vllm"]  # without --model: the config's r, no rank finding
    assert vllm.concerns[0] == "target_parameters"


def test_cli_reports_sglang_by_name(peft_experts, capsys):
    base, adapter = peft_experts
    assert main(["inspect", str(adapter), "--model", str(base), "--target", "sglang", "--target", "vllm"]) == 0
    out = capsys.readouterr().out
    assert "portability: sglang: differs" in out and "portability: vllm: differs" in out
