"""It learns: SFT then GRPO with exact_match raises held-out exact match over SFT alone, and DPO on (correct,
corrupted) pairs raises held-out preference accuracy to >= 0.9 (lorakit's Python API: Trainer + objectives +
the engine's sampler + the built-in rewards).

The task has checkable answers: reverse three letters ("c a f =" -> "f a c"). A tiny Llama learns it from scratch
by a short supervised run, stopped while it is still unsure (its sampled answers right about half the time);
then each preference stage trains a LoRA adapter on top, its reference the SFT model (adapters disabled). Every
step is seeded and runs on CPU, so the numbers are the same on every run.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

import lorakit as lk
from lorakit.align.rewards import RewardScorer
from lorakit.align.rollouts import EngineSampler
from lorakit.hf.preference_batches import collate_pairs, collate_prompts
from lorakit.train import (
    DPOConfig,
    DPOObjective,
    GRPOConfig,
    GRPOObjective,
    TrainConfig,
    Trainer,
    reference_logps,
    token_logps,
)

pytestmark = pytest.mark.slow  # a supervised run and two preference runs: seconds each

LETTERS = "abcdefgh"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_tokenizer() -> Any:
    """A WordLevel tokenizer over the task's words; decoding joins them with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", "=", *LETTERS]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def problems() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(prompt, answer) pairs, every triple of distinct letters, shuffled: 286 to train on, 50 held out."""
    triples = list(itertools.permutations(LETTERS, 3))
    random.Random(0).shuffle(triples)
    rows = [(" ".join(t) + " =", " ".join(reversed(t))) for t in triples]
    return rows[:-50], rows[-50:]


def sft_model(tok: Any, train: list[tuple[str, str]], steps: int) -> Any:
    """A tiny Llama trained from scratch (every weight) on the prompts' answers for `steps` steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tok),
        max_position_embeddings=32,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    rows = []
    for prompt, answer in train:  # each prompt twice: reversed (right) and copied (the confusable wrong answer)
        for text in (answer, copied(prompt)):
            p, a = tok(prompt)["input_ids"], tok(text)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor(p + a)
            labels = torch.tensor([-100] * len(p) + a)
            rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    loader = DataLoader(
        rows, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0), collate_fn=_stack
    )
    Trainer(model, TrainConfig(max_steps=steps, lr=3e-3, device="cpu", seed=0), callbacks=[]).fit(loader)
    return model.eval()


def copied(prompt: str) -> str:
    """The prompt's letters in their own order: the wrong answer the SFT data teaches beside the right one."""
    return prompt.removesuffix(" =")


def _stack(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def prompt_rows(tok: Any, rows: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"prompt_ids": tok(p)["input_ids"], "prompt": p, "answer": a} for p, a in rows]


def exact_match(model: Any, tok: Any, rows: list[tuple[str, str]], n: int, seed: int = 1234) -> float:
    """The mean exact match of `n` sampled answers (temperature 1) per held-out prompt: the policy's accuracy."""
    sampler = EngineSampler(model, tok, max_new_tokens=4, temperature=1.0, top_p=1.0, top_k=0)
    scorer = RewardScorer(tok, ("exact_match",), (1.0,))
    batch = collate_prompts(prompt_rows(tok, rows), tok.pad_token_id)
    completions = sampler([tok(p)["input_ids"] for p, _ in rows], n, seed)
    return float(scorer(batch, completions, n).nanmean())


SFT_STEPS = 100
DPO_STEPS = 20


@pytest.fixture(scope="module")
def task() -> Iterator[dict[str, Any]]:
    """The tokenizer, the train and held-out problems, and the SFT model both preference stages start from; one
    torch thread while they run (the numbers then match on every machine, and a shared CPU is not oversubscribed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = make_tokenizer()
        train, held_out = problems()
        yield {"tok": tok, "train": train, "held_out": held_out, "sft": sft_model(tok, train, SFT_STEPS)}
    finally:
        torch.set_num_threads(threads)


def with_adapter(model: Any) -> Any:
    """A LoRA adapter on every projection of a deep copy of `model` (its SFT weights stay the reference)."""
    import copy

    torch.manual_seed(0)
    return lk.apply_lora(copy.deepcopy(model), lk.LoraConfig(rank=8, alpha=16.0), TARGETS)


def test_grpo_raises_held_out_exact_match_over_sft(task):
    tok, train, held_out, sft = task["tok"], task["train"], task["held_out"], task["sft"]
    model = with_adapter(sft)
    before = exact_match(model, tok, held_out, n=8)  # the fresh adapter (B = 0) computes exactly what SFT does
    cfg = GRPOConfig(num_generations=8, max_completion_length=4, rewards=("exact_match",))
    sampler = EngineSampler(model, tok, max_new_tokens=4, temperature=1.0, top_p=1.0, top_k=0)
    scorer = RewardScorer(tok, cfg.rewards, cfg.weights)
    objective = GRPOObjective(model, cfg, sampler, scorer, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    loader = DataLoader(
        prompt_rows(tok, train),
        batch_size=8,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        collate_fn=functools.partial(collate_prompts, pad_id=tok.pad_token_id),
    )
    Trainer(model, TrainConfig(max_steps=20, lr=5e-3, device="cpu", seed=0), objective=objective, callbacks=[]).fit(
        loader
    )
    after = exact_match(model.eval(), tok, held_out, n=8)
    print(f"held-out exact match (8 samples per prompt): SFT {before:.3f} -> SFT + GRPO {after:.3f}")
    assert 0.1 < before < 0.8  # the SFT model is unsure: there is room to learn
    assert after >= before + 0.15


@torch.no_grad()
def preference_accuracy(model: Any, rows: list[dict[str, Any]], pad_id: int) -> float:
    """The fraction of pairs whose chosen completion has the higher summed log-prob under `model` as it is (its
    adapter on): the margin log p(chosen) - log p(rejected) > 0."""
    batch = collate_pairs(rows, pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    sums = (token_logps(logits, batch["input_ids"]) * batch["completion_mask"][:, 1:]).sum(1)  # (2B,)
    chosen, rejected = sums.chunk(2)
    return float((chosen > rejected).float().mean())


def pairs(tok: Any, rows: list[tuple[str, str]], seed: int) -> list[dict[str, Any]]:
    """(prompt, correct answer, corrupted answer): the letters not reversed, or one of them swapped for another."""
    rng = random.Random(seed)
    out = []
    for prompt, answer in rows:
        letters = answer.split()
        if rng.random() < 0.5:
            bad = list(reversed(letters))
        else:
            bad = list(letters)
            bad[rng.randrange(3)] = rng.choice([c for c in LETTERS if c not in letters])
        enc = lambda s: tok(s)["input_ids"] + [tok.eos_token_id]  # noqa: E731
        out.append(
            {"prompt_ids": tok(prompt)["input_ids"], "chosen_ids": enc(answer), "rejected_ids": enc(" ".join(bad))}
        )
    return out


def test_dpo_raises_held_out_preference_accuracy(task):
    tok, train, held_out, sft = task["tok"], task["train"], task["held_out"], task["sft"]
    valid = pairs(tok, held_out, seed=1)
    before = preference_accuracy(sft, valid, tok.pad_token_id)
    model = with_adapter(sft)
    cfg = DPOConfig(beta=0.1)
    collate = functools.partial(collate_pairs, pad_id=tok.pad_token_id)
    rows = pairs(tok, train, seed=0)
    refs = reference_logps(model, rows, collate, config=cfg, batch_size=64, device=torch.device("cpu"))
    rows = [{**r, "ref_chosen_logps": c, "ref_rejected_logps": j} for r, (c, j) in zip(rows, refs, strict=True)]
    loader = DataLoader(
        rows, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0), collate_fn=collate
    )
    config = TrainConfig(max_steps=DPO_STEPS, lr=5e-3, device="cpu", seed=0)
    Trainer(model, config, objective=DPOObjective(model, cfg), callbacks=[]).fit(loader)
    after = preference_accuracy(model.eval(), valid, tok.pad_token_id)
    print(f"held-out preference accuracy: SFT {before:.3f} -> SFT + DPO {after:.3f}")
    assert before < 0.8  # the SFT model often prefers the corrupted answer
    assert after >= 0.9
