"""Sequence packing (hf/packing.py): a packed batch trains exactly as the same examples unpacked.

The oracle is the unpacked batch itself: transformers' causal-LM loss is the mean over every labelled token of
the batch, so a packed batch of the same examples must give the same loss and the same gradient for every
LoRA parameter. Around it: the packer's invariants (no row over max_length, every example exactly once,
positions restarting), the padding fractions reported, GPT-2 (which honours packing too), OPT (which does not,
and is refused), and `lorakit finetune --pack` end to end.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
transformers = pytest.importorskip("transformers")

import _hf_models  # noqa: E402
from _tiny_models import gpt2, llama  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.hf import data, packing  # noqa: E402
from lorakit.hf.finetune import FinetuneJob, prepare  # noqa: E402

transformers.utils.logging.set_verbosity_error()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def examples(n: int = 9, seed: int = 0, vocab: int = 100, longest: int = 11) -> list[data.Encoded]:
    """Causal-lm examples of mixed lengths; every third one is prompt/completion (-100 on its prompt)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(2, longest)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 1) if i % 3 == 0 else 0
        out.append({"input_ids": ids, "labels": [data.IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def lora(model):
    model = lk.apply_lora(model, lk.LoraConfig(rank=4, alpha=8.0), ["all-linear"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init would leave every lora_A gradient zero
        for layer in lk.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    for m in model.modules():  # GPT-2's own dropouts (0.1) would draw different masks for different shapes
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.train()


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


# -- the packer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [11, 16, 40])
def test_rows_fit_and_hold_every_example_once(max_length):
    exs = examples(n=60, seed=max_length)
    rows = packing.pack(exs, max_length)
    assert all(len(r["input_ids"]) <= max_length for r in rows)
    groups = packing.plan([len(e["input_ids"]) for e in exs], max_length)
    assert sorted(i for g in groups for i in g) == list(range(len(exs)))
    for row, group in zip(rows, groups, strict=True):  # each row is its group's examples, whole and in order
        assert row["input_ids"] == [t for i in group for t in exs[i]["input_ids"]]
    assert len(rows) < len(exs)  # it packed
    assert packing.pack(exs, max_length) == rows  # deterministic


def test_positions_restart_and_no_label_crosses_a_boundary():
    exs = examples(n=7)
    for row in packing.pack(exs, 20):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert starts[0] == 0
        ends = starts[1:] + [len(row["input_ids"])]
        for s, e in zip(starts, ends, strict=True):
            assert row["position_ids"][s:e] == list(range(e - s))
            assert row["labels"][s] == data.IGNORE_INDEX
            source = next(x for x in exs if x["input_ids"] == row["input_ids"][s:e])
            assert row["labels"][s + 1 : e] == source["labels"][1:]


def test_collate_pads_with_ignored_labels_and_its_own_positions():
    rows = packing.pack([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}], 3)
    batch = packing.collate(rows, pad_id=0)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]


def test_packer_refuses_too_long_and_class_labels():
    with pytest.raises(ValueError, match="example 1 has 9 tokens: expected 1 to max_length=8"):
        packing.plan([3, 9], 8)
    with pytest.raises(ValueError, match="packing is for causal-lm"):
        packing.pack([{"input_ids": [1, 2], "labels": 1}], 8)
    with pytest.raises(ValueError, match=r"pack=True is for task 'causal-lm'"):
        FinetuneJob(model="m", data="d", task="seq-cls", out="o", pack=True)


def test_padding_fraction_counts_pad_over_all_tokens():
    assert packing.padding_fraction([4, 2, 3, 3], batch_size=4) == pytest.approx(4 / 16)
    assert packing.padding_fraction([5, 5], batch_size=1) == 0.0
    lengths = [2, 9, 3, 8]
    by_hand = []  # the seeded order, two at a time, each pair padded to its longest
    order = list(lengths)
    random.Random(3).shuffle(order)
    for a, b in (order[:2], order[2:]):
        by_hand += [max(a, b) - a, max(a, b) - b]
    assert packing.padding_fraction(lengths, 2, seed=3) == pytest.approx(sum(by_hand) / (sum(by_hand) + 22))
    exs = examples(n=40)
    s = packing.summary(exs, packing.pack(exs, 24), batch_size=4, seed=0)
    assert s["rows_before"] == 40 and s["rows_after"] < 40 and s["tokens"] == sum(len(e["input_ids"]) for e in exs)
    assert 0.0 <= s["padding_fraction_packed"] < s["padding_fraction_unpacked"] < 1.0


# -- the model sees the same thing ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
def test_packed_batch_gives_the_unpacked_loss_and_lora_gradients(build):
    exs = examples(n=9)
    model = lora(build())
    packing.check_model(model)  # both architectures honour packed position_ids
    want_loss, want = loss_and_grads(model, data.collate(exs, pad_id=0))  # token-weighted mean, as packed
    rows = packing.pack(exs, 20)
    assert len(rows) < len(exs)
    got_loss, got = loss_and_grads(model, packing.collate(rows, pad_id=0))
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    assert got.keys() == want.keys() and len(want) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)
    # the control: with the config's use_cache=True transformers skips the packed detection and attends across
    leaky = {k: v for k, v in packing.collate(rows, pad_id=0).items() if k != "use_cache"}
    assert (loss_and_grads(model, leaky)[0] - want_loss).abs() > 1e-3


def test_a_model_that_ignores_position_ids_is_refused_by_name():
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )
    opt = lora(transformers.OPTForCausalLM(cfg))
    with pytest.raises(ValueError, match=r"pack=True: the 'opt' model \(OPTForCausalLM\) does not keep"):
        packing.check_model(opt)
    assert opt.training  # the probe left the mode as it was


# -- the job and the CLI --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return _hf_models.save_tiny("llama", tmp_path_factory.mktemp("models") / "llama")


def write_rows(path: Path) -> Path:
    qa = [{"prompt": "question : what is two plus two ? answer :", "completion": "four"}] * 4
    rows = qa + [{"text": s} for s in _hf_models.SENTENCES] * 2
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_finetune_pack_packs_training_rows_and_reports_what_it_saved(tmp_path, tiny_llama):
    rows = write_rows(tmp_path / "train.jsonl")
    job = FinetuneJob(
        model=tiny_llama, data=rows, task="causal-lm", out=tmp_path / "a", batch_size=4, max_length=32, pack=True
    )
    setup = prepare(job)
    assert setup.packing is not None and setup.packing["rows_before"] == len(setup.prepared.train)
    assert setup.packing["rows_after"] == len(setup.train_loader.dataset) < len(setup.prepared.train)
    batch = next(iter(setup.train_loader))
    assert "position_ids" in batch and "attention_mask" not in batch
    assert "attention_mask" in next(iter(setup.valid_loader))  # validation stays unpacked


@pytest.mark.slow
def test_cli_finetune_pack_prints_the_padding_saved(tmp_path, tiny_llama):
    rows = write_rows(tmp_path / "train.jsonl")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorakit",
            "finetune",
            "--model",
            str(tiny_llama),
            "--data",
            str(rows),
            "--task",
            "causal-lm",
            "--out",
            str(tmp_path / "a"),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--max-length",
            "32",
            "--plain",
            "--pack",
            "--gradient-checkpointing",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("packing: "))
    report = json.loads((tmp_path / "a" / "run" / "finetune_report.json").read_text())
    p = report["packing"]
    assert f"{p['rows_before']} rows -> {p['rows_after']}" in line and p["rows_after"] < p["rows_before"]
    assert p["padding_fraction_packed"] < p["padding_fraction_unpacked"] and report["gradient_checkpointing"] is True
    assert "packing: " in r.stderr  # the progress line of the packing step
