"""`lorakit finetune --target-parameters` on a tiny mixture-of-experts model saved to disk (Qwen3-MoE, experts as
fused 3-D weights): the expert LoRA trains, the run says what each rule matched, PEFT loads the adapter, and a
rule that matches nothing is an input error naming its flag. In process (`main`): the same entry point."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _cli import _causal_rows, _logits, _write_jsonl  # noqa: E402

peft = pytest.importorskip("peft")

from lorakit.cli import main  # noqa: E402
from lorakit.hf import models as hf  # noqa: E402

pytestmark = pytest.mark.slow  # a whole finetune in process

EXPERTS_LINE = (
    "targets all-experts: 4 parameters (mlp.experts.gate_up_proj, mlp.experts.down_proj in 2 layers); "
    "router weights not adapted"
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_moe")
    return {
        "model": _hf_models.save_tiny("qwen3_moe", root / "moe"),
        "rows": _write_jsonl(root / "train.jsonl", _causal_rows()),
    }


def _finetune(files: dict[str, Path], out: Path, *flags: str) -> list[str]:
    argv = ["finetune", "--model", files["model"], "--data", files["rows"], "--task", "causal-lm", "--out", out]
    argv += ["--rank", "4", "--batch-size", "8", "--max-length", "16", "--device", "cpu", "--plain", *flags]
    return [str(a) for a in argv]


def test_finetune_trains_expert_lora_and_says_what_it_matched(files, tmp_path, capsys):
    out = tmp_path / "experts"
    assert main(_finetune(files, out, "--target-parameters", "all-experts", "--epochs", "3", "--lr", "2e-2")) == 0
    said = capsys.readouterr().out
    assert EXPERTS_LINE in said.splitlines(), said
    report = json.loads((out / "run" / "finetune_report.json").read_text())
    assert report["after"]["loss"] < report["before"]["loss"]
    # a rank-4 pair per expert on gate_up_proj (4, 24, 16) and down_proj (4, 16, 12) in 2 layers, nothing else
    assert report["trainable_params"] == 2 * 4 * 4 * ((16 + 24) + (12 + 16))
    assert report["matched"] == [EXPERTS_LINE.removeprefix("targets ")]
    assert 'target_parameters = ["all-experts"]' in (out / "run" / "run.toml").read_text()  # a run file key too

    ours, _, _ = hf.load_with_adapter(files["model"], out)  # the saved adapter loads back ...
    want = _logits(ours)
    assert (want - _logits(hf.load_model(files["model"], "causal-lm"))).abs().max() > 1e-3  # ... and is no base
    theirs = peft.PeftModel.from_pretrained(hf.load_model(files["model"], "causal-lm"), out)  # PEFT reads it the same
    torch.testing.assert_close(_logits(theirs), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--target-parameters", "experts.nope"],
            "--target-parameters: target parameter 'experts.nope' matches no parameter; parameters LoRA can target: ",
        ),
        (["--targets", "nope", "--target-parameters", "all-experts"], "--targets: target 'nope' matches no module"),
        (
            ["--target-parameters", "model.norm.weight"],
            "--target-parameters: parameter 'model.norm.weight' has shape (16,) (1-D)",
        ),
    ],
)
def test_rules_that_match_nothing_exit_2_naming_the_flag(files, tmp_path, capsys, flags, message):
    assert main(_finetune(files, tmp_path / "out", *flags)) == 2
    assert message in capsys.readouterr().err
