"""lorakit.hf against real transformers models: tiny random Llama/GPT-2 built here, MiniLM from its package."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402  (sets HF_HUB_OFFLINE before transformers loads)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lorakit as lk  # noqa: E402
from lorakit.files import inspect as adapter_info  # noqa: E402
from lorakit.hf import models as hf  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: _hf_models.save_tiny(kind, root / kind) for kind in ("llama", "gpt2")}


def _randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every trainable tensor (lora_B starts at zero) non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


IDS = torch.tensor([[4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _logits(model, ids=IDS, mask=MASK) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# -- loading ----------------------------------------------------------------------------------------


def test_not_a_model_directory_is_a_clear_error(tmp_path, tiny):
    with pytest.raises(hf.ModelDirError, match="no such directory"):
        hf.load(tmp_path / "missing", "causal-lm")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(hf.ModelDirError, match="not a directory"):
        hf.load(tmp_path / "file.txt", "causal-lm")
    with pytest.raises(hf.ModelDirError, match="no config.json"):
        hf.load(tmp_path, "causal-lm")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(hf.ModelDirError, match="no weights"):
        hf.load(tmp_path, "causal-lm")
    with pytest.raises(ValueError, match="task='translation'"):
        hf.load_model(tiny["gpt2"], "translation")
    with pytest.raises(ValueError, match="needs id2label"):
        hf.load_model(tiny["gpt2"], "seq-cls")


def test_remote_code_needs_the_flag(tmp_path, tiny):
    d = tmp_path / "remote"
    d.mkdir()
    for f in tiny["gpt2"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.RemoteCodeError, match="trust_remote_code=True"):
        hf.load_model(d, "causal-lm")


# -- apply_lora on real architectures --------------------------------------------------------------

ARCHS = {
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 14, "lm_head"),
    "gpt2": (["c_attn", "c_proj", "c_fc"], 8, "lm_head"),
}


@pytest.mark.parametrize("kind", ARCHS)
def test_apply_lora_on_decoders(tiny, kind):
    targets, n, head = ARCHS[kind]
    model, _ = hf.load(tiny[kind], "causal-lm")
    before = _logits(model)
    lk.apply_lora(model, lk.LoraConfig(rank=2, alpha=4.0), targets)
    layers = lk.lora_layers(model)
    assert len(layers) == n and {name.rpartition(".")[2] for name in layers} == set(targets)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)  # B = 0: exactly the base

    fresh, _ = hf.load(tiny[kind], "causal-lm")
    lk.apply_lora(fresh, lk.LoraConfig(rank=2), "all-linear")
    names = set(lk.lora_layers(fresh))
    assert names == set(layers) and head not in names  # all-linear: every linear layer but the output head


def test_generate_refuses_a_model_that_cannot_generate():
    # found by mypy: a classifier failed with AttributeError deep in generate()
    model, tok = hf.load(_hf_models.minilm_dir(), "seq-cls", id2label={0: "a", 1: "b"})
    with pytest.raises(TypeError, match="BertForSequenceClassification cannot generate text"):
        hf.generate(model, tok, "hello")


def test_apply_lora_on_bert_minilm():
    model, _ = hf.load(_hf_models.minilm_dir(), "seq-cls", id2label={0: "a", 1: "b"})
    lk.apply_lora(
        model, lk.LoraConfig(rank=2), ["query", "key", "value", "dense"], modules_to_save=hf.head_names(model)
    )
    layers = lk.lora_layers(model)
    # per layer: query, key, value, attention.output.dense, intermediate.dense, output.dense; plus pooler.dense
    assert len(layers) == 6 * 6 + 1 and "classifier" not in layers
    assert all(p.requires_grad for p in model.classifier.trained.parameters())
    all_linear = hf.load(_hf_models.minilm_dir(), "seq-cls", id2label={0: "a", 1: "b"})[0]
    lk.apply_lora(all_linear, lk.LoraConfig(rank=2), "all-linear")
    assert "classifier" not in lk.lora_layers(all_linear)


# -- PEFT interop -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "minilm"])
def test_seq_cls_head_saved_with_adapter_and_peft_loads_it(tmp_path, tiny, kind):
    path = _hf_models.minilm_dir() if kind == "minilm" else tiny[kind]
    id2label = {0: "neg", 1: "neu", 2: "pos"}
    torch.manual_seed(0)
    model, _ = hf.load(path, "seq-cls", id2label=id2label)
    lk.apply_lora(model, lk.LoraConfig(rank=4, alpha=8.0), "all-linear", modules_to_save=hf.head_names(model))
    _randomize(model)
    ids = IDS if kind != "minilm" else IDS + 1000
    want = _logits(model, ids)
    out = lk.save_adapters(model, tmp_path / "adapter")
    hf.write_task_file(out, "seq-cls", base_model=path, id2label=id2label)
    assert hf.read_task(out) == ("seq-cls", id2label)

    torch.manual_seed(123)  # a differently initialised head: the adapter's head must replace it
    base, _ = hf.load(path, "seq-cls", id2label=id2label)
    theirs = peft.PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(_logits(theirs, ids), want, rtol=1e-5, atol=1e-5)

    ours, _, task = hf.load_with_adapter(path, out)
    assert task == "seq-cls" and ours.config.id2label == id2label
    torch.testing.assert_close(_logits(ours, ids), want, rtol=1e-6, atol=1e-6)


def test_peft_made_adapter_loads_merges_and_inspects(tmp_path, tiny):
    base, tok = hf.load(tiny["llama"], "causal-lm")
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    theirs = peft.get_peft_model(base, cfg)
    want = _logits(theirs)
    theirs.save_pretrained(tmp_path / "peft")

    info = adapter_info.describe(tmp_path / "peft")
    assert info["loadable"] and info["ranks"] == [4] and len(info["modules"]) == 6
    q = next(m for m in info["modules"] if m["module"].endswith("layers.0.self_attn.q_proj"))
    assert q["base_weight_shape"] == [32, 32] and q["alpha"] == 8
    assert "q_proj" in adapter_info.render(info)

    model, tok, task = hf.load_with_adapter(tiny["llama"], tmp_path / "peft")
    assert task == "causal-lm"
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)
    assert hf.save_merged(model, tok, tmp_path / "merged") == 6
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged), want, rtol=1e-4, atol=1e-5)
    assert (
        transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")("the cat")["input_ids"]
        == tok("the cat")["input_ids"]
    )


def test_peft_seq_cls_adapter_without_lorakit_task_file(tmp_path, tiny):
    base = hf.load_model(tiny["gpt2"], "seq-cls", id2label={0: "x", 1: "y", 2: "z"})
    theirs = peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False, task_type="SEQ_CLS"
        ),
    )
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "modules_to_save" in name:
                p.normal_()  # a trained head
    want = _logits(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    assert hf.read_task(tmp_path / "peft") == ("seq-cls", {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    ours, _, task = hf.load_with_adapter(tiny["gpt2"], tmp_path / "peft")
    torch.testing.assert_close(_logits(ours), want, rtol=1e-5, atol=1e-5)


def test_save_merged_refuses_a_non_empty_directory(tmp_path, tiny):
    model, tok = hf.load(tiny["gpt2"], "causal-lm")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        hf.save_merged(model, tok, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_gpt2_conv1d_adapter_round_trips_through_peft(tmp_path, tiny):
    model, _ = hf.load(tiny["gpt2"], "causal-lm")
    lk.apply_lora(model, lk.LoraConfig(rank=2, alpha=2.0), ["c_attn", "c_proj", "c_fc"])
    _randomize(model)
    want = _logits(model)
    out = lk.save_adapters(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(hf.load(tiny["gpt2"], "causal-lm")[0], out)
    torch.testing.assert_close(_logits(theirs), want, rtol=1e-5, atol=1e-5)
    info = adapter_info.describe(out / "adapter_model.safetensors")
    c_attn = next(m for m in info["modules"] if m["module"].endswith("h.0.attn.c_attn"))
    assert c_attn["base_weight_shape"] == [32, 96]  # Conv1D stores (d_in, d_out)


# -- transformers.Trainer ----------------------------------------------------------------------------


@pytest.mark.slow
def test_lorakit_model_trains_inside_transformers_trainer(tmp_path, tiny):
    model, tok = hf.load(tiny["gpt2"], "causal-lm")
    lk.apply_lora(model, lk.LoraConfig(rank=4, alpha=8.0), "all-linear")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    rows = [{"input_ids": tok(s)["input_ids"], "labels": tok(s)["input_ids"]} for s in _hf_models.SENTENCES]
    from lorakit.hf import data

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=len(rows),
        max_steps=15,
        learning_rate=3e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=rows, data_collator=lambda b: data.collate(b, tok.pad_token_id)
    )
    before = trainer.evaluate(rows)["eval_loss"]
    trainer.train()
    after = trainer.evaluate(rows)["eval_loss"]
    assert after < before - 0.1, (before, after)  # a random tiny model: a clear drop, not convergence
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # the base never moves
    assert any(layer.lora_B.abs().sum() > 0 for layer in lk.lora_layers(model).values())


@pytest.mark.parametrize("targets,saved", [(["q_proj", "v_proj"], ["lm_head"]), (["q_proj", "embed_tokens"], [])])
def test_save_merged_unties_a_trained_copy_of_a_tied_head(tmp_path, targets, saved):
    """Regression: a trained lm_head (modules_to_save) of a tied Llama was saved apart from embed_tokens but with
    `tie_word_embeddings: true` in config.json, so transformers ties it back to the embeddings (at `tie_weights()`,
    which resizing embeddings calls, or in any loader that trusts the config) and the trained head is lost.
    LoRA merged into tied embeddings parts them the same way (the head keeps the base's weight, as unmerged)."""
    import _tiny_models

    model = _tiny_models.llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lk.apply_lora(model, lk.LoraConfig(rank=2, alpha=4.0), targets, modules_to_save=saved)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # as after training: LoRA factors and the head's trained copy moved
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ids = torch.randint(0, 100, (2, 9), generator=g)
    want = _logits(model, ids, torch.ones_like(ids))
    hf.save_merged(model, _hf_models.tokenizer(bos=True), tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reloaded.tie_weights()  # what the config says, transformers does
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    torch.testing.assert_close(_logits(reloaded, ids, torch.ones_like(ids)), want, rtol=0, atol=1e-5)


def test_save_merged_keeps_a_head_that_is_still_tied_tied(tmp_path):
    import _tiny_models

    model = _tiny_models.llama(tie_word_embeddings=True)
    lk.apply_lora(model, lk.LoraConfig(rank=2), ["q_proj"])
    hf.save_merged(model, _hf_models.tokenizer(bos=True), tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
