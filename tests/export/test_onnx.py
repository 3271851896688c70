"""`lorakit export --format onnx`: the real all-MiniLM-L6-v2 with a seq-cls adapter and a tiny Llama, merged, exported
with torch's exporter and reloaded in onnxruntime, which must give lorakit's logits (within 1e-4) and predictions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

onnxruntime = pytest.importorskip("onnxruntime")

import lorakit as lk  # noqa: E402
from lorakit.cli import main  # noqa: E402
from lorakit.export import onnx  # noqa: E402
from lorakit.hf import models as hf  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
HELD_OUT = [  # none of them is a proof text (onnx.PROOF_TEXTS)
    "the red team beat the blue team",
    "what a terrible, boring afternoon",
    "a quiet evening at home with a book and tea",
    "great",
    "the service was slow but the food was wonderful",
]


def _randomise_lora(model: torch.nn.Module, seed: int) -> None:
    """Non-zero B matrices (a fresh adapter computes the base exactly, which would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """(model dir, seq-cls adapter dir) for all-MiniLM-L6-v2 with a 3-label head."""
    root = tmp_path_factory.mktemp("minilm")
    model_dir = _hf_models.minilm_dir()
    model = hf.load_model(model_dir, "seq-cls", id2label=LABELS)
    lk.apply_lora(model, lk.LoraConfig(rank=4, alpha=8), "all-linear", modules_to_save=hf.head_names(model))
    _randomise_lora(model, 0)
    # A random head centred on calibration texts (not the held-out ones), so that its predictions differ from text
    # to text: MiniLM's pooled outputs share a large common part, which alone would pick one label for all.
    calibration = onnx.proof_inputs(hf.load_tokenizer(model_dir), _hf_models.SENTENCES)
    head = model.classifier.trained
    with torch.no_grad():
        pooled = model.bert(**calibration).pooler_output  # (N, H)
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(3)))
        head.bias.copy_(-(pooled.mean(0) @ head.weight.T))
    adapter = lk.save_adapters(model, root / "cls")
    hf.write_task_file(adapter, "seq-cls", id2label=LABELS)
    return model_dir, adapter


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(model dir, causal-lm adapter dir) for a tiny random Llama."""
    root = tmp_path_factory.mktemp("llama")
    model_dir = _hf_models.save_tiny("llama", root / "llama")
    model, _ = hf.load(model_dir, "causal-lm")
    lk.apply_lora(model, lk.LoraConfig(rank=4, alpha=8), ["q_proj", "v_proj", "down_proj"])
    _randomise_lora(model, 1)
    adapter = lk.save_adapters(model, root / "lm")
    hf.write_task_file(adapter, "causal-lm")
    return model_dir, adapter


def _onnx_logits(onnx_file: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return torch.from_numpy(session.run(["logits"], {k: v.numpy() for k, v in batch.items() if k in names})[0])


def _lorakit_logits(model_dir: Path, adapter: Path, texts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """lorakit's own logits, adapter unmerged, and the batch they were computed on."""
    model, tok, _ = hf.load_with_adapter(model_dir, adapter)
    batch = onnx.proof_inputs(tok, texts)
    with torch.no_grad():
        return model.eval()(**batch).logits, batch


def test_minilm_seq_cls_cli(minilm, tmp_path):
    """The CLI exports, prints and writes a passing proof; onnxruntime predicts the held-out texts as lorakit does."""
    model_dir, adapter = minilm
    out = tmp_path / "onnx"
    r = subprocess.run([sys.executable, "-m", "lorakit", "export", "--model", str(model_dir), "--adapter", str(adapter),
                        "--format", "onnx", "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"exported seq-cls model to {out / 'model.onnx'}; proof onnxruntime" in r.stdout
    proof = json.loads((out / "proof.json").read_text())
    assert proof["passed"] and proof["tolerance"] == 1e-4 and proof["argmax_agree"] == proof["positions"] == 4
    assert json.loads((out / "config.json").read_text())["id2label"] == {str(k): v for k, v in LABELS.items()}
    reference, batch = _lorakit_logits(model_dir, adapter, HELD_OUT)
    got = _onnx_logits(out / "model.onnx", batch)
    assert (got - reference).abs().max() < 1e-4
    assert got.argmax(-1).tolist() == reference.argmax(-1).tolist()
    assert len(set(reference.argmax(-1).tolist())) > 1  # the adapter's head tells the texts apart


def test_tiny_llama_logits(llama, tmp_path):
    """A tiny Llama's next-token logits through onnxruntime, on other lengths than the export's, within 1e-4."""
    model_dir, adapter = llama
    done = onnx.export_onnx(model_dir, [adapter], tmp_path / "out")
    assert done.task == "causal-lm" and done.proof.passed and done.proof.max_abs_diff < 1e-4
    texts = ["the cat sat", "hello world good morning one two three", "a bird sang a song"]
    reference, batch = _lorakit_logits(model_dir, adapter, texts)
    got = _onnx_logits(done.onnx_file, batch)
    real = batch["attention_mask"].bool()
    assert (got[real] - reference[real]).abs().max() < 1e-4
    assert torch.equal(got[real].argmax(-1), reference[real].argmax(-1))
    base, _ = hf.load(model_dir, "causal-lm")
    with torch.no_grad():
        assert (base.eval()(**batch).logits[real] - reference[real]).abs().max() > 1e-2  # the adapter is in there


def test_two_adapters_summed(llama, tmp_path):
    """Two causal-lm adapters export as their sum: onnxruntime matches the base with one merged, then the other."""
    from lorakit.loading import load_adapters

    model_dir, adapter = llama
    other_model, _ = hf.load(model_dir, "causal-lm")
    lk.apply_lora(other_model, lk.LoraConfig(rank=2, alpha=4), ["k_proj", "up_proj", "v_proj"])
    _randomise_lora(other_model, 2)
    other = lk.save_adapters(other_model, tmp_path / "other")
    hf.write_task_file(other, "causal-lm")
    done = onnx.export_onnx(model_dir, [adapter, other], tmp_path / "out")
    assert done.proof.passed
    model, tok = hf.load(model_dir, "causal-lm")
    load_adapters(model, adapter)
    lk.merge(model)
    load_adapters(model, other, allow_base_mismatch=True)  # onto the base with `adapter` merged in: on purpose
    batch = onnx.proof_inputs(tok, ["the cat sat on the mat", "good morning"])
    with torch.no_grad():
        reference = model.eval()(**batch).logits
    real = batch["attention_mask"].bool()
    assert (_onnx_logits(done.onnx_file, batch)[real] - reference[real]).abs().max() < 1e-4


def test_failed_proof_leaves_nothing(llama, tmp_path):
    """A proof that fails (here: a tolerance no export meets) raises and leaves nothing at out, nor beside it."""
    model_dir, adapter = llama
    with pytest.raises(onnx.ProofFailed, match="FAILED"):
        onnx.export_onnx(model_dir, [adapter], tmp_path / "out", tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_bad_input_exit_2(llama, tmp_path, capsys):
    """A quantised base, an unknown format, a missing adapter: exit 2 with the reason, nothing written."""
    model_dir, adapter = llama
    quantised = tmp_path / "q"
    quantised.mkdir()
    for f in model_dir.iterdir():
        (quantised / f.name).write_bytes(f.read_bytes())
    config = json.loads((quantised / "config.json").read_text())
    (quantised / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bnb"}}))
    out = tmp_path / "out"
    cases = [
        (["--model", quantised, "--adapter", adapter], "the base is quantised (bnb)"),
        (["--model", model_dir, "--adapter", adapter, "--format", "tflite"], "--format 'tflite' is not supported"),
        (["--model", model_dir, "--adapter", tmp_path / "nope"], "no such directory"),
    ]
    for args, message in cases:
        assert main(["export", *map(str, args), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
