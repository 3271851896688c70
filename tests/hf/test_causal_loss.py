"""The chunked causal-LM loss (hf/causal_loss.py) against the model's own `model(**batch).loss`: the same loss and
LoRA gradients to 1e-5 on tiny Llama, Qwen2 and Qwen3 with padding, prompt masking and packed rows, the same
counts as the plain path; a wrapper (DDP/FSDP) runs the plain path; heads it cannot take are named."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
transformers = pytest.importorskip("transformers")

import lorakit as lk  # noqa: E402
from lorakit.hf import causal_loss, data, packing  # noqa: E402
from lorakit.hf.causal_loss import CausalLMChunkedLoss, chunked_loss_supported, resolve_loss  # noqa: E402
from lorakit.train import batch as batches  # noqa: E402

transformers.utils.logging.set_verbosity_error()
VOCAB = 160
SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
SIZES |= {"num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 64}


def build(kind: str, **extra):
    torch.manual_seed(0)
    if kind == "llama-tied":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, tie_word_embeddings=True, **extra))
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    }
    config, model = classes[kind]
    return model(config(**SIZES, tie_word_embeddings=False, **extra))


def lora(model, targets=("all-linear",)):
    model = lk.apply_lora(model, lk.LoraConfig(rank=4, alpha=8.0), list(targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init would leave every lora_A gradient zero
        for layer in lk.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    return model.train()


def examples(n: int = 9, longest: int = 11) -> list[data.Encoded]:
    """Examples of mixed lengths; every third one is prompt/completion (-100 on its prompt)."""
    rng = random.Random(0)
    out = []
    for i in range(n):
        ids = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, longest))]
        prompt = rng.randint(1, len(ids) - 1) if i % 3 == 0 else 0
        out.append({"input_ids": ids, "labels": [data.IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


BATCHES = {
    "padded-prompt-masked": lambda: data.collate(examples(), pad_id=0),
    "packed": lambda: packing.collate(packing.pack(examples(), 20), pad_id=0),
}


def loss_and_grads(model, score):
    model.zero_grad(set_to_none=True)
    out = score()
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("batch", BATCHES.values(), ids=BATCHES.keys())
@pytest.mark.parametrize("kind", ["llama", "llama-tied", "qwen2", "qwen3"])
def test_chunked_loss_gives_the_models_loss_and_lora_gradients(kind, batch):
    model, b = lora(build(kind)), batch()
    assert chunked_loss_supported(model) is None
    objective = CausalLMChunkedLoss(model, chunk_tokens=7)  # chunks that do not divide the tokens
    want, want_grads = loss_and_grads(model, lambda: batches._mapping(model, b, None))
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    got, got_grads = loss_and_grads(model, lambda: objective(model, b))
    assert not calls  # the lm_head module never runs: its weight meets the trained positions only
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    assert (got.samples, got.units, got.unit) == (want.samples, want.units, want.unit)
    assert got.outputs is None and got.targets is b["labels"]
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 10
    assert all("lora_" in n for n in want_grads)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-5, rtol=1e-5, msg=name)


def test_under_bf16_autocast_and_no_grad_it_follows_the_plain_path():
    model, b = lora(build("llama")), BATCHES["padded-prompt-masked"]()
    objective = CausalLMChunkedLoss(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = loss_and_grads(model, lambda: batches._mapping(model, b, None))
        got, got_grads = loss_and_grads(model, lambda: objective(model, b))
    torch.testing.assert_close(got.loss.float(), want.loss.float(), atol=1e-2, rtol=1e-2)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=3e-2, rtol=3e-2, msg=name)
    with torch.inference_mode():
        torch.testing.assert_close(objective(model.eval(), b).loss, model(**b).loss, atol=1e-5, rtol=1e-5)


class Wrapper(torch.nn.Module):
    """What DDP or FSDP is to the objective: another module that runs the model."""

    def __init__(self, model):
        super().__init__()
        self.module, self.calls = model, 0

    def forward(self, **batch):
        self.calls += 1
        return self.module(**batch)


def test_a_wrapped_model_runs_the_plain_path_through_its_wrapper():
    model, b = lora(build("llama")), BATCHES["packed"]()
    net = Wrapper(model)
    got = CausalLMChunkedLoss(model)(net, b)
    want = batches._mapping(model, b, None)
    assert net.calls == 1 and got.outputs is not None  # the plain path: logits and all
    torch.testing.assert_close(got.loss, want.loss)


def test_unsupported_heads_are_named_and_auto_falls_back_to_plain():
    heads = {
        "LoraLinear, not a plain nn.Linear": lora(build("llama"), targets=("all-linear", "lm_head")),
        r"soft-capped \(final_logit_softcapping=30": build("gemma2", head_dim=8),
        "model type 'gpt2' is not one": transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4)
        ),
        "not a transformers causal LM": torch.nn.Linear(2, 2),
    }
    for reason, model in heads.items():
        assert chunked_loss_supported(model) is not None
        with pytest.raises(ValueError, match=reason):
            resolve_loss("chunked", model, "causal-lm")
        with pytest.raises(ValueError, match=reason):
            CausalLMChunkedLoss(model)
        assert resolve_loss("auto", model, "causal-lm") == "plain"


def test_auto_takes_chunked_from_the_measured_vocabulary_size_and_for_causal_lm_only(monkeypatch):
    model = build("llama")
    assert resolve_loss("plain", model, "causal-lm") == "plain"
    assert resolve_loss("chunked", model, "causal-lm") == "chunked"
    assert VOCAB < causal_loss.CHUNKED_LOSS_MIN_VOCAB and resolve_loss("auto", model, "causal-lm") == "plain"
    monkeypatch.setattr(causal_loss, "CHUNKED_LOSS_MIN_VOCAB", VOCAB)
    assert resolve_loss("auto", model, "causal-lm") == "chunked"
    assert resolve_loss("auto", model, "dpo") == "plain"
    with pytest.raises(ValueError, match="task 'seq-cls' has its own loss"):
        resolve_loss("chunked", model, "seq-cls")
