"""The `lorakit` command on classification in real subprocesses: a seq-cls finetune from CSV with string labels
(head saved, PEFT loads it, merge), and on MiniLM, where LoRA beats a frozen encoder with a trained head.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _cli import DATA, _logits, in_process, lorakit  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lorakit.hf import data  # noqa: E402
from lorakit.hf import models as hf  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"gpt2": _hf_models.save_tiny("gpt2", root / "gpt2")}  # the one model this module classifies with


def test_finetune_seq_cls_csv_string_labels_head_saved_and_merged(tmp_path, tiny, capsys):
    """The finetune is the real process; merge is called in process (`in_process`): its real process's exit
    codes are test_cli.py's and test_cli_adapters.py's, here what matters is the directory it writes."""
    csv_path = tmp_path / "train.csv"
    lines = ["text,label"] + [
        f"{s},{'animal' if any(w in s for w in ('cat', 'dog', 'bird', 'fox')) else 'other'}"
        for s in _hf_models.SENTENCES
    ] * 2
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "cls"
    r = lorakit(
        "finetune",
        "--model",
        tiny["gpt2"],
        "--data",
        csv_path,
        "--task",
        "seq-cls",
        "--out",
        out,
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--valid-fraction",
        "0.25",
        "--device",
        "cpu",
        "--plain",
    )
    assert r.returncode == 0, r.stderr
    assert "valid_accuracy=" in r.stdout
    task = json.loads((out / "lorakit_task.json").read_text())
    assert task["task"] == "seq-cls" and task["id2label"] == {"0": "animal", "1": "other"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"] and config["task_type"] == "SEQ_CLS"

    ours, _, _ = hf.load_with_adapter(tiny["gpt2"], out)
    want = _logits(ours)
    base = hf.load_model(tiny["gpt2"], "seq-cls", id2label={0: "animal", 1: "other"})
    theirs = peft.PeftModel.from_pretrained(base, out)
    diff = (_logits(theirs) - want).abs().max().item()
    print(f"\nPEFT parity (seq-cls with modules_to_save head): max |Δlogits| = {diff:.3g}")
    assert diff < 1e-5

    status, _, err = in_process(
        capsys, "merge", "--model", tiny["gpt2"], "--adapter", out, "--out", tmp_path / "merged", "--dtype", "float32"
    )
    assert status == 0, err
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.id2label == {0: "animal", 1: "other"}
    assert (_logits(merged) - want).abs().max().item() < 1e-4


# -- the real model: MiniLM, where LoRA beats a frozen encoder -------------------------------------------


def test_minilm_lora_beats_frozen_encoder_with_trained_head(tmp_path):
    """Who won: 'the red team lost to the blue team'. Both teams are in every sentence, so a frozen
    sentence encoder (order-blind features) plus the best linear head does badly; LoRA learns it."""
    train, valid = DATA / "winners_train.jsonl", DATA / "winners_valid.jsonl"
    out = tmp_path / "minilm"
    r = lorakit(
        "finetune",
        "--model",
        _hf_models.minilm_dir(),
        "--data",
        train,
        "--valid",
        valid,
        "--task",
        "seq-cls",
        "--out",
        out,
        "--targets",
        "query",
        "value",
        "--rank",
        "8",
        "--epochs",
        "2",
        "--lr",
        "3e-3",
        "--batch-size",
        "16",
        "--max-length",
        "32",
        "--device",
        "cpu",
        "--plain",
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "run" / "finetune_report.json").read_text())
    lora_acc = report["after"]["accuracy"]

    # baseline: the frozen encoder's features, and the best linear head on them that training can find
    tok = hf.load_tokenizer(_hf_models.minilm_dir())
    prepared = data.prepare(train, "seq-cls", tok, valid_path=valid, max_length=32)
    model = hf.load_model(_hf_models.minilm_dir(), "seq-cls", id2label=prepared.id2label).eval()

    def features(rows):
        b = data.collate(rows, tok.pad_token_id)
        with torch.no_grad():
            pooled = model.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).pooler_output  # (B, 384)
        return pooled, b["labels"]

    (xt, yt), (xv, yv) = features(prepared.train), features(prepared.valid)
    torch.manual_seed(0)
    head = torch.nn.Linear(xt.shape[1], 2)  # what BertForSequenceClassification puts on the pooled output
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(500):
        loss = torch.nn.functional.cross_entropy(head(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        frozen_acc = (head(xv).argmax(-1) == yv).float().mean().item()
        frozen_train_acc = (head(xt).argmax(-1) == yt).float().mean().item()
    print(
        f"\nMiniLM winners task, held-out accuracy: lorakit LoRA {lora_acc:.3f} (before training "
        f"{report['before']['accuracy']:.3f}); frozen encoder + trained head {frozen_acc:.3f} "
        f"(train {frozen_train_acc:.3f})"
    )
    assert lora_acc >= 0.9
    assert lora_acc >= frozen_acc + 0.15
