"""GRPO against its oracle, TRL 1.16's GRPOTrainer, for the same completions and rewards.

TRL runs its real code: `_generate_and_score_completions` on prompt rows (the completions come from a
`rollout_func` returning fixed token ids, the given input of the comparison, as lorakit's objective gets them
from a fixed Sampler), then `_compute_loss` and backward on a PEFT-wrapped tiny Llama holding lorakit's LoRA
factors. TRL keeps its per-token loss in a local variable: it is read from `_compute_loss`'s frame on return.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from _hf_models import tokenizer  # noqa: E402
from _tiny_models import llama  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.train import group_advantages  # noqa: E402

G = 4
PROMPTS = ["the cat sat on the", "question : what is two plus two ? answer :"]
ANSWERS = ["mat", "four"]
TARGETS = ["q_proj", "v_proj", "up_proj"]
TEMPERATURE = 0.7
MAX_LEN = 6
WEIGHTS = (1.0, 0.5)


def has_word(prompts, completions, completion_ids, **kwargs):
    """1 when the completion says "the", plus 0.1 per token; None for 2-token completions."""
    pairs = zip(completions, completion_ids, strict=True)
    return [None if len(ids) == 2 else float("the" in c) + 0.1 * len(ids) for c, ids in pairs]


def shortness(prompts, completions, completion_ids, **kwargs):
    """-length/4, None for 2-token completions (so a 2-token completion is scored by no function)."""
    return [None if len(ids) == 2 else -len(ids) / 4 for ids in completion_ids]


def completions(tok) -> list[list[int]]:
    """B*G fixed completions: EOS-terminated and truncated ones, lengths 1..MAX_LEN, one unscorable per group."""
    eos, v = tok.eos_token_id, tok.convert_tokens_to_ids
    words = [
        ["the", "mat"],  # 2 tokens + EOS = 3
        ["mat"],  # + EOS = 2: unscorable
        ["the", "dog", "ran", "in", "the", "park"],  # truncated at MAX_LEN
        ["the", "cat"],
        ["four"],  # + EOS = 2: unscorable
        ["two", "plus", "two"],
        ["the", "quick", "brown", "fox", "jumps"],
        [],  # EOS only
    ]
    return [[v(w) for w in ws] + ([] if len(ws) >= MAX_LEN else [eos]) for ws in words]


class FixedSampler:
    """The given completions, whatever the prompts; records the seeds it is handed. Switches the model to eval
    as a generation does."""

    def __init__(self, model, rows: list[list[int]]) -> None:
        self.model, self.rows, self.seeds = model, rows, []

    def __call__(self, prompts: list[list[int]], n: int, seed: int) -> list[list[int]]:
        self.seeds.append(seed)
        self.model.eval()
        return [list(r) for r in self.rows[: len(prompts) * n]]


class FnScorer:
    """TRL-style reward functions on decoded completions (nan where a function returns None)."""

    def __init__(self, tok, fns=(has_word, shortness), weights=WEIGHTS) -> None:
        self.tok, self.fns = tok, fns
        self.names, self.weights = tuple(f.__name__ for f in fns), tuple(weights)

    def __call__(self, batch, rows: list[list[int]], n: int) -> torch.Tensor:
        prompts = [p for p in batch["prompt"] for _ in range(n)]
        texts = self.tok.batch_decode(rows, skip_special_tokens=True)
        cols = [f(prompts=prompts, completions=texts, completion_ids=rows) for f in self.fns]
        return torch.tensor([[math.nan if r is None else r for r in col] for col in cols], dtype=torch.float32).T


@pytest.fixture(scope="module")
def tok():
    return tokenizer(bos=True)


@pytest.fixture(scope="module")
def base():
    return llama()


@pytest.fixture(scope="module")
def policy(base):
    """lorakit's LoRA on a copy of the tiny Llama, B random (so the policy differs from the base reference)."""
    model = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=4, alpha=8.0), TARGETS)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.lora_B.normal_(0, 0.2)
    return model.train()


def prompt_batch(tok) -> dict:
    """The collate_prompts layout: left-padded prompt ids and mask, texts, answers."""
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    width = max(map(len, ids))
    return {
        "prompt_ids": torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in ids]),
        "prompt_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids]),
        "prompt": list(PROMPTS),
        "answer": list(ANSWERS),
    }


def trl_trainer(base, policy, tok, tmp, **overrides):
    """TRL's GRPOTrainer on PEFT LoRA (reference: adapters disabled) holding `policy`'s factors."""
    import peft
    import trl
    from datasets import Dataset

    rows = completions(tok)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]

    def rollout(prompts, trainer):
        ids = [prompt_ids[PROMPTS.index(p)] for p in prompts]
        return {"prompt_ids": ids, "completion_ids": [list(r) for r in rows], "logprobs": None}

    settings = dict(beta=0.0, loss_type="dapo", scale_rewards="group", epsilon=0.2, epsilon_high=0.28)
    args = trl.GRPOConfig(
        output_dir=str(tmp),
        per_device_train_batch_size=len(PROMPTS) * G,
        num_generations=G,
        max_completion_length=MAX_LEN,
        temperature=TEMPERATURE,
        reward_weights=list(WEIGHTS),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        **{**settings, **overrides},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.GRPOTrainer(
            model=copy.deepcopy(base),
            reward_funcs=[has_word, shortness],
            args=args,
            train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
            processing_class=tok,
            peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0),
            rollout_func=rollout,
        )
    ours = lk.lora_layers(policy)
    with torch.no_grad():
        for name, module in trainer.model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                layer = ours[name.removeprefix("base_model.model.")]
                module.lora_A["default"].weight.copy_(layer.lora_A)
                module.lora_B["default"].weight.copy_(layer.lora_B)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets with no accumulation
    return trainer


def trl_inputs(trainer):
    """What TRL's training step hands `_compute_loss`: the B*G prompt rows as its RepeatSampler repeats them."""
    return trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])


def run_trl_loss(trainer, inputs) -> tuple[torch.Tensor, dict, dict[str, torch.Tensor]]:
    """TRL's `_compute_loss` + backward: the loss, the locals of its frame on return, the LoRA grads by our names."""
    frames = {}
    code = type(trainer)._compute_loss.__code__

    def watch(frame, event, arg):
        if event == "return" and frame.f_code is code:
            frames.update(frame.f_locals)

    trainer.model.zero_grad()
    sys.setprofile(watch)
    try:
        loss = trainer._compute_loss(trainer.model, inputs)
    finally:
        sys.setprofile(None)
    loss.backward()
    grads = {}
    for name, p in trainer.model.named_parameters():
        if p.grad is not None:
            key = name.removeprefix("base_model.model.").replace(".default.weight", "")
            grads[key] = p.grad.clone()
    return loss.detach(), frames, grads


def our_grads(model) -> dict[str, torch.Tensor]:
    """lorakit's LoRA factor grads, named as `run_trl_loss` names PEFT's."""
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def last(trainer, name: str) -> float:
    """The latest value TRL logged under metric `name`."""
    return trainer._metrics["train"][name][-1]


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_and_reward_metrics_equal_trl(base, policy, tok, tmp_path, scale_rewards):
    trainer = trl_trainer(base, policy, tok, tmp_path, scale_rewards=scale_rewards)
    inputs = trl_inputs(trainer)
    scorer = FnScorer(tok)
    per_func = scorer({"prompt": PROMPTS}, completions(tok), G)
    rewards = (per_func * torch.tensor(WEIGHTS)).nansum(1)
    rewards[per_func.isnan().all(1)] = math.nan
    ours = group_advantages(rewards, G, scale_rewards)
    assert torch.allclose(ours, inputs["advantages"], atol=1e-6), (ours, inputs["advantages"])
    assert (ours[[1, 4]] == 0).all()  # the unscorable completions move nothing
