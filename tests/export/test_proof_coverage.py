"""Every proof covers what users run: the chat template, every special token, and the adapter's own effect.

Oracles:
- a zeroed-adapter export (every lora_b zeroed on its way into the adapter GGUF, or zeroed before the merge of a
  merged GGUF or ONNX graph) must FAIL the proof at a lossy dtype, where the logits' own tolerance (relative to the
  largest logit) is larger than a small adapter's whole effect;
- a corrupted `<|im_end|>` embedding row must FAIL the proof, though no user text contains that token.
Each has a control: the same export, uncorrupted, passes.
"""

import sys
from pathlib import Path

import gguf as gguf_py
import llama_cpp  # noqa: F401  (the export extra: a missing runtime fails here, never skips)
import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit as lk
import lorakit.model
from lorakit.export import gguf, onnx, prepare

sys.path.insert(0, str(Path(__file__).parent))
from _bpe_styles import save_styled_llama  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

SCALE = 0.011  # the adapter's A and B ~ N(0, SCALE²): its effect on the logits is under f16's logits tolerance


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """(base dir, adapter dir, the adapter's effect): a tiny Llama with a Qwen2-style ChatML tokenizer and a small
    adapter on attention and MLP."""
    root = tmp_path_factory.mktemp("coverage")
    base = save_styled_llama(root / "base", "qwen2")
    model = lk.apply_lora(
        AutoModelForCausalLM.from_pretrained(base),
        lk.LoraConfig(rank=4, alpha=4),
        ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * SCALE)
    lk.save_adapters(model, root / "adapter")
    return base, root / "adapter"


def _loaded(chat):
    base, adapter = chat
    return prepare.load_unmerged(base, [adapter])


def _zero_lora_b_in_the_file(monkeypatch):
    """The adapter GGUF's writer, patched to write every lora_b as zeros (an empty adapter, same shapes)."""
    add = gguf_py.GGUFWriter.add_tensor

    def zeroed(self, name, tensor, *args, **kwargs):
        return add(self, name, tensor * 0 if name.endswith(".lora_b") else tensor, *args, **kwargs)

    monkeypatch.setattr(gguf_py.GGUFWriter, "add_tensor", zeroed)


def _zero_lora_b_before_the_merge(monkeypatch):
    """lorakit's merge, patched to zero every lora_B first: the merged artefact is the base alone."""
    merge = lorakit.model.merge

    def zeroed(model, *args, **kwargs):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.zero_()
        return merge(model, *args, **kwargs)

    monkeypatch.setattr(lorakit.model, "merge", zeroed)


def _assert_within_the_logits_tolerance_yet_failed(proof):
    """The case the logits check alone passed: the whole effect is inside the lossy tolerance."""
    assert proof.max_abs_diff <= proof.tolerance and proof.tokenizer_agrees is not False
    assert not proof.passed and proof.adapter_error > proof.adapter_tolerance
    assert proof.adapter_effect < proof.tolerance  # the premise: the adapter is small beside the logits' bound


def test_a_zeroed_adapter_fails_the_f16_gguf_adapter_proof(chat, tmp_path, monkeypatch):
    model, tok, task = _loaded(chat)
    base, adapter = chat
    done = gguf.export_gguf(model, tok, task, base, [adapter], tmp_path / "ok", dtype="f16", adapter_only=True)
    proof = done.proof
    assert proof.passed and proof.adapter_error < proof.adapter_tolerance / 4  # control: the real one is proven
    _zero_lora_b_in_the_file(monkeypatch)
    with pytest.raises(prepare.ProofFailed, match="does not carry the adapter's effect") as e:
        gguf.export_gguf(model, tok, task, base, [adapter], tmp_path / "zeroed", dtype="f16", adapter_only=True)
    _assert_within_the_logits_tolerance_yet_failed(e.value.proof)
    assert e.value.proof.adapter_error == pytest.approx(e.value.proof.adapter_effect, rel=0.05)
    assert not (tmp_path / "zeroed").exists()


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_a_zeroed_adapter_fails_the_f16_merged_proof(chat, tmp_path, monkeypatch, fmt):
    def export(out):
        model, tok, task = _loaded(chat)
        if fmt == "onnx":
            return onnx.export_loaded(model, tok, task, out, dtype="f16")
        return gguf.export_gguf(model, tok, task, chat[0], [chat[1]], out, dtype="f16")

    proof = export(tmp_path / "ok").proof
    assert proof.passed and proof.adapter_error < proof.adapter_tolerance  # control
    _zero_lora_b_before_the_merge(monkeypatch)
    with pytest.raises(prepare.ProofFailed, match="too small to prove at f16|does not carry") as e:
        export(tmp_path / "zeroed")
    _assert_within_the_logits_tolerance_yet_failed(e.value.proof)


def test_a_corrupted_im_end_row_fails_the_proof(chat, tmp_path, monkeypatch):
    """No proof text a user passes contains <|im_end|>; the rendered chat and the special-token texts do."""
    model, tok, task = _loaded(chat)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    add = gguf_py.GGUFWriter.add_tensor

    def corrupted(self, name, tensor, *args, **kwargs):
        if name == "token_embd.weight":
            tensor = tensor.copy()
            tensor[im_end] = -tensor[im_end]
        return add(self, name, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf_py.GGUFWriter, "add_tensor", corrupted)
    with pytest.raises(prepare.ProofFailed) as e:
        gguf.export_gguf(
            model,
            tok,
            task,
            chat[0],
            [chat[1]],
            tmp_path / "bad",
            dtype="f32",
            adapter_only=True,
            texts=["Hello there."],
        )
    assert e.value.proof.what == "base" and e.value.proof.tokenizer_agrees and e.value.proof.max_abs_diff > 1e-2
    monkeypatch.undo()
    done = gguf.export_gguf(
        model, tok, task, chat[0], [chat[1]], tmp_path / "good", dtype="f32", adapter_only=True, texts=["Hello there."]
    )
    assert all(p.passed for p in done.proofs)  # control
