"""`lorakit finetune` with the variant flags: --use-dora --init --quantize --loraplus-ratio, end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # _hf_models
sys.path.insert(0, str(Path(__file__).parent))  # _cli
import _hf_models  # noqa: E402
from _cli import _causal_rows, _logits, _write_jsonl, lorakit  # noqa: E402

peft = pytest.importorskip("peft")
pytest.importorskip("torchao")

from lorakit.hf import models as hf  # noqa: E402

pytestmark = pytest.mark.slow  # whole finetune runs in process (tens of seconds each): not in the fast set


def test_finetune_dora_pissa_nf4_loraplus_loads_in_peft_on_the_original_base(tmp_path):
    model_dir = _hf_models.save_tiny("gpt2", tmp_path / "gpt2")
    rows = _write_jsonl(tmp_path / "train.jsonl", _causal_rows())
    out = tmp_path / "adapter"
    r = lorakit(
        "finetune",
        "--model",
        model_dir,
        "--data",
        rows,
        "--task",
        "causal-lm",
        "--out",
        out,
        "--rank",
        "4",
        "--epochs",
        "2",
        "--lr",
        "1e-2",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--plain",
        "--use-dora",
        "--init",
        "pissa",
        "--quantize",
        "nf4",
        "--loraplus-ratio",
        "16",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "run" / "finetune_report.json").read_text())
    assert report["quantize"] == "nf4" and report["train"]["loraplus_ratio"] == 16
    assert report["lora"]["use_dora"] and report["lora"]["init"] == "pissa"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["r"] == 8 and cfg["init_lora_weights"] is True  # rank-2r conversion
    ours, _, _ = hf.load_with_adapter(model_dir, out)  # the original, unquantised base
    theirs = peft.PeftModel.from_pretrained(hf.load_model(model_dir, "causal-lm"), out)
    torch.testing.assert_close(_logits(theirs), _logits(ours), rtol=1e-4, atol=1e-5)


def test_bad_variant_flags_exit_2(tmp_path):
    r = lorakit(
        "finetune",
        "--model",
        tmp_path,
        "--data",
        "x.jsonl",
        "--task",
        "causal-lm",
        "--out",
        tmp_path / "o",
        "--quantize",
        "fp4",
    )
    assert r.returncode == 2 and "--quantize" in r.stderr
