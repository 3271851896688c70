"""The forgetting monitor on a tiny real Llama: KL(adapted ‖ base) is 0 for a fresh LoRA, matches
torch's kl_div against an untouched copy of the base, respects padding, grows with training, and leaves the
model as it found it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader

import lorakit as lk
from lorakit.train import Evaluated, ReferenceKL, TrainConfig, Trainer, reference_loader

VOCAB = 40


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _reference() -> DataLoader:
    ids = torch.randint(1, VOCAB, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    return reference_loader(ids, chunk=8, batch_size=2, pad_id=0)  # 6 chunks, the last one 5 tokens + 3 pads


def _train_batches(n: int = 6) -> DataLoader:
    g = torch.Generator().manual_seed(2)
    rows = []
    for _ in range(n * 4):
        ids = torch.randint(1, 6, (12,), generator=g)  # a narrow vocabulary: training moves the model a lot
        rows.append({"input_ids": ids, "attention_mask": torch.ones(12, dtype=torch.long), "labels": ids})
    return DataLoader(rows, batch_size=4)


def _adapted() -> tuple[nn.Module, nn.Module]:
    base = _llama()
    original = copy.deepcopy(base)
    model = lk.apply_lora(base, lk.LoraConfig(rank=4, alpha=8), ["all-linear"], modules_to_save=["lm_head"])
    return model, original


def test_a_fresh_lora_is_at_kl_zero_and_the_model_is_left_as_it_was() -> None:
    model, _ = _adapted()
    model.train()
    kl = ReferenceKL(_reference()).measure(model, torch.device("cpu"))
    assert kl == pytest.approx(0.0, abs=1e-6)
    assert model.training and all(m.training for m in model.modules())
    assert not any(getattr(m, "disabled", False) for m in model.modules())


def test_kl_equals_kl_div_against_an_untouched_base_copy_over_unpadded_tokens() -> None:
    model, original = _adapted()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move the adapter and the saved head away from the base
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    loader = _reference()
    got = ReferenceKL(loader).measure(model, torch.device("cpu"))

    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            log_p = torch.log_softmax(model(**batch).logits, -1)
            log_q = torch.log_softmax(original(**batch).logits, -1)
            per_token = nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # KL(p ‖ q)
            keep = batch["attention_mask"].bool()
            total += float(per_token[keep].sum())
            tokens += int(keep.sum())
    assert tokens == 45  # the padding of the last chunk is not counted
    assert got > 1e-3
    assert got == pytest.approx(total / tokens, rel=1e-5)

    bare = ReferenceKL([b["input_ids"][:, :5] for b in loader])  # bare id tensors: every position counts
    assert bare.measure(model, torch.device("cpu")) > 0
    with pytest.raises(TypeError, match="'input_ids'"):
        ReferenceKL([[1, 2, 3]]).measure(model, torch.device("cpu"))


def test_the_trainer_reports_kl_ref_growing_with_training(tmp_path) -> None:
    model, _ = _adapted()
    events: list = []
    cfg = TrainConfig(epochs=2, lr=1e-2, device="cpu", eval_every=2, log_every=2)
    trainer = Trainer(model, cfg, callbacks=[events.append], artifact_dir=tmp_path, reference=ReferenceKL(_reference()))
    trainer.fit(_train_batches())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] in ("eval", "epoch")]
    assert [(r["kind"], r["step"]) for r in evals] == [
        ("eval", 2),
        ("eval", 4),
        ("epoch", 6),
        ("eval", 8),
        ("eval", 10),
        ("epoch", 12),
    ]
    assert all(r["valid_loss"] is None for r in evals)  # no valid loader: the KL alone
    kls = [r["kl_ref"] for r in evals]
    assert kls[0] > 0 and kls[-1] > kls[0], kls
    seen = [e.kl_ref for e in events if isinstance(e, Evaluated)]
    assert seen == [r["kl_ref"] for r in evals if r["kind"] == "eval"]
    assert not (tmp_path / "best_adapter").exists()  # best needs a valid loss
