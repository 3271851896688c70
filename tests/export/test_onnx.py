"""`lorakit export --format onnx`: the real all-MiniLM-L6-v2 with a seq-cls adapter and a tiny Llama, merged, exported
with torch's exporter (f32, f16, q8_0) and reloaded in onnxruntime, which must give lorakit's logits (within the dtype's
tolerance) and predictions; bf16 is refused, and onnxruntime really cannot run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
import _hf_models  # noqa: E402
import onnxruntime  # noqa: E402  (the export extra; CI installs it: a missing runtime fails, never skips)
from _proof_fields import assert_proof_fields  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.cli import main  # noqa: E402
from lorakit.export import onnx  # noqa: E402
from lorakit.export.prepare import ProofFailed  # noqa: E402
from lorakit.hf import models as hf  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

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
    torch.manual_seed(0)  # the LoRA A matrices' init: the measured errors in docs/export.md are for this adapter
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


@pytest.fixture(scope="module")
def exported(minilm, llama, tmp_path_factory):
    """exported(kind, dtype): the export of MiniLM (through the CLI: (out, CompletedProcess)) or the tiny Llama
    (through the API: (out, Exported)) in `dtype`, made once per module."""
    done: dict[tuple[str, str], tuple[Path, object]] = {}

    def get(kind: str, dtype: str) -> tuple[Path, object]:
        if (kind, dtype) not in done:
            out = tmp_path_factory.mktemp(f"{kind}-{dtype}") / "onnx"
            if kind == "minilm":
                args = ["--model", minilm[0], "--adapter", minilm[1], "--out", out, "--dtype", dtype]
                r = subprocess.run(
                    [sys.executable, "-m", "lorakit", "export", *map(str, args)],
                    capture_output=True,
                    text=True,
                    env=ENV,
                    timeout=300,
                )
                done[kind, dtype] = out, r
            else:
                done[kind, dtype] = out, onnx.export_onnx(llama[0], [llama[1]], out, dtype=dtype)
        return done[kind, dtype]

    return get


def _size(out: Path) -> int:
    """Bytes of the graph and its weights."""
    return sum(f.stat().st_size for f in out.glob(onnx.ONNX_FILE + "*"))


def _bound(dtype: str, reference: torch.Tensor) -> float:
    """The dtype's tolerance for these logits (relative for the lossy dtypes, as the proof states it)."""
    return onnx.TOLERANCE[dtype] * (max(1.0, float(reference.abs().max())) if dtype in onnx.RELATIVE else 1.0)


@pytest.mark.parametrize("dtype", onnx.DTYPES)
def test_minilm_seq_cls_cli(minilm, exported, dtype):
    """The CLI exports, prints and writes a passing proof; onnxruntime predicts the held-out texts as lorakit does,
    within the dtype's stated tolerance; f16 and q8_0 files are smaller than f32's."""
    model_dir, adapter = minilm
    out, r = exported("minilm", dtype)
    assert r.returncode == 0, r.stderr
    assert f"exported seq-cls model to {out / 'model.onnx'} ({dtype}); proof in {out / 'proof.json'}" in r.stdout
    assert "proof: onnxruntime" in r.stdout
    proofs = json.loads((out / "proof.json").read_text())
    assert proofs["passed"] and len(proofs["proofs"]) == 1
    assert_proof_fields(out)  # every field says something: "what" names the merged graph
    proof = proofs["proofs"][0]
    assert proof["what"] == "merged"
    # the four proof texts and one of the tokenizer's special tokens ([PAD][UNK][CLS][SEP][MASK])
    assert proof["passed"] and proof["dtype"] == dtype and proof["positions"] == 5
    # q8_0 may part from lorakit only at a near-tie (the proof's rule): "ok" (top two 0.08 apart) flipped here, on
    # this AMD CPU; another CPU's int8 kernels may keep it
    assert proof["argmax_agree"] == 5 or (dtype == "q8_0" and proof["argmax_agree"] >= 4)
    assert proof["adapter_error"] <= proof["adapter_tolerance"] < proof["adapter_effect"]
    assert proof["max_abs_diff"] <= proof["tolerance"]
    assert json.loads((out / "config.json").read_text())["id2label"] == {str(k): v for k, v in LABELS.items()}
    assert sorted(f.name for f in out.glob("model.onnx*")) == ["model.onnx", "model.onnx.data"]  # no f32 left over
    reference, batch = _lorakit_logits(model_dir, adapter, HELD_OUT)
    got = _onnx_logits(out / "model.onnx", batch)
    assert (got - reference).abs().max() < _bound(dtype, reference)
    if dtype == "q8_0":  # a prediction may differ only where lorakit's own top two are within 2 × the bound
        chosen = reference.gather(-1, got.argmax(-1, keepdim=True)).squeeze(-1)
        assert (reference.max(-1).values - chosen <= 2 * _bound(dtype, reference)).all()
    else:
        assert got.argmax(-1).tolist() == reference.argmax(-1).tolist()
    assert len(set(reference.argmax(-1).tolist())) > 1  # the adapter's head tells the texts apart
    if dtype == "f32":
        assert proof["tolerance"] == 1e-4
    else:
        assert _size(out) < 0.7 * _size(exported("minilm", "f32")[0])


@pytest.mark.parametrize("dtype", onnx.DTYPES)
def test_tiny_llama_logits(llama, exported, dtype):
    """A tiny Llama's next-token logits through onnxruntime, on other lengths than the export's, within the dtype's
    tolerance and with lorakit's greedy tokens; f16 and q8_0 files are smaller than f32's."""
    model_dir, adapter = llama
    out, done = exported("llama", dtype)
    assert done.task == "causal-lm" and done.proof.passed and done.proof.dtype == dtype
    assert done.proof.max_abs_diff <= done.proof.tolerance
    texts = ["the cat sat", "hello world good morning one two three", "a bird sang a song"]
    reference, batch = _lorakit_logits(model_dir, adapter, texts)
    got = _onnx_logits(done.artefact, batch)
    real = batch["attention_mask"].bool()
    assert (got[real] - reference[real]).abs().max() < _bound(dtype, reference[real])
    if dtype == "f32":
        assert torch.equal(got[real].argmax(-1), reference[real].argmax(-1))
    else:  # a lossy graph may part from lorakit's greedy token only at a near-tie (the proof's rule; CPUs differ)
        chosen = reference[real].gather(-1, got[real].argmax(-1, keepdim=True)).squeeze(-1)
        assert (reference[real].max(-1).values - chosen <= 2 * _bound(dtype, reference[real])).all()
    base, _ = hf.load(model_dir, "causal-lm")
    with torch.no_grad():
        assert (base.eval()(**batch).logits[real] - reference[real]).abs().max() > 1e-2  # the adapter is in there
    if dtype != "f32":
        assert _size(out) < _size(exported("llama", "f32")[0])


def test_bf16_refused_as_onnxruntime_cannot_run_it(llama, tmp_path, capsys):
    """--dtype bf16 exits 2 naming the missing kernel, writing nothing; and onnxruntime's CPU provider really has no
    bfloat16 Add (when it gains one, this fails: then export bf16 and prove it like the others)."""
    from onnx import TensorProto, helper

    model_dir, adapter = llama
    out = tmp_path / "out"
    args = ["export", "--model", str(model_dir), "--adapter", str(adapter), "--dtype", "bf16", "--out", str(out)]
    assert main(args) == 2
    assert "--dtype bf16 is refused for --format onnx" in capsys.readouterr().err
    assert not out.exists()
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "g",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    with pytest.raises(Exception, match=r"Could not find an implementation for Add\(14\)"):
        onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


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
    assert (_onnx_logits(done.artefact, batch)[real] - reference[real]).abs().max() < 1e-4


def test_failed_proof_leaves_nothing(llama, tmp_path):
    """A proof that fails (here: a tolerance no export meets) raises and leaves nothing at out, nor beside it."""
    model_dir, adapter = llama
    with pytest.raises(ProofFailed, match="FAILED"):
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
