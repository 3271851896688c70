"""hf.load_model refuses a model that would train from randomly initialised parts (hf/task_fit.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

from lorakit.hf import models as hf  # noqa: E402


def _without(model_dir: Path, *keys: str) -> Path:
    """The checkpoint in `model_dir` with `keys` dropped."""
    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k not in keys}, weights, metadata={"format": "pt"})
    return model_dir


def test_an_encoder_is_no_causal_lm_but_classifies():
    with pytest.raises(
        hf.TaskMismatchError,
        match=r"bert is an encoder \(bidirectional attention\); it cannot be "
        r"fine-tuned as a causal-lm \(its causal-LM head would start from random weights: cls\.",
    ) as e:
        hf.load_model(_hf_models.minilm_dir(), "causal-lm")
    assert e.value.can == "seq-cls" and str(e.value).endswith("fine-tune it as task='seq-cls'")
    model = hf.load_model(_hf_models.minilm_dir(), "seq-cls", id2label={0: "a", 1: "b"})  # the head is new by design
    assert type(model).__name__ == "BertForSequenceClassification"


def test_a_missing_weight_is_refused_by_name(tmp_path):
    llama = _without(_hf_models.save_tiny("llama", tmp_path / "llama"), "lm_head.weight")
    with pytest.raises(
        hf.TaskMismatchError,
        match="lacks weights the causal-lm model needs, so they would start from random values: lm_head.weight",
    ):
        hf.load_model(llama, "causal-lm")
    hf.load_model(llama, "seq-cls", id2label={0: "a", 1: "b"})  # a classifier does not use lm_head
    _without(llama, "model.norm.weight")
    with pytest.raises(hf.TaskMismatchError, match="seq-cls: .*model.norm.weight"):
        hf.load_model(llama, "seq-cls", id2label={0: "a", 1: "b"})


def test_complete_decoders_load_for_both_tasks(tmp_path):
    for kind in ("gpt2", "llama"):  # gpt2's lm_head is tied to its embeddings: not missing
        d = _hf_models.save_tiny(kind, tmp_path / kind)
        hf.load_model(d, "causal-lm")
        hf.load_model(d, "seq-cls", id2label={0: "a", 1: "b"})
