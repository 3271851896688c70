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
from lorakit.train import (  # noqa: E402
    GRPOConfig,
    GRPOObjective,
    TrainConfig,
    Trainer,
    group_advantages,
    grpo_loss,
    grpo_metrics,
)
from lorakit.train.grpo import grpo_stats  # noqa: E402
from lorakit.train.rollout_batch import rollout_batch  # noqa: E402

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
        bf16=False,  # TRL's default is bf16 autocast; lorakit's is fp32
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
def test_advantages_equal_trl(base, policy, tok, tmp_path, scale_rewards):
    trainer = trl_trainer(base, policy, tok, tmp_path, scale_rewards=scale_rewards)
    inputs = trl_inputs(trainer)
    ours = group_advantages(per_row_rewards(tok), G, scale_rewards)
    assert torch.allclose(ours, inputs["advantages"], atol=1e-6), (ours, inputs["advantages"])
    assert (ours[[1, 4]] == 0).all()  # the unscorable completions move nothing


def objective(model, tok, **overrides) -> GRPOObjective:
    """lorakit's GRPO objective with the TRL trainer's settings, the fixed completions and the test's scorer."""
    settings = dict(beta=0.0, loss_type="dapo", scale_rewards="group", epsilon=0.2, epsilon_high=0.28)
    cfg = GRPOConfig(
        num_generations=G, max_completion_length=MAX_LEN, temperature=TEMPERATURE, **{**settings, **overrides}
    )
    sampler = FixedSampler(model, completions(tok))
    return GRPOObjective(model, cfg, sampler, FnScorer(tok), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_per_token_loss_kl_clip_fractions_and_grads_equal_trl(base, policy, tok, tmp_path, loss_type, beta):
    """Old log-probs unlike the current ones (as after an earlier optimizer step) exercise the clipping."""
    trainer = trl_trainer(base, policy, tok, tmp_path, loss_type=loss_type, beta=beta)
    inputs = trl_inputs(trainer)
    obj = objective(policy, tok, loss_type=loss_type, beta=beta)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    rb = rollout_batch(prompts, completions(tok), G, pad_id=tok.pad_token_id)
    mask = rb.completion_mask.bool()
    assert torch.equal(rb.completion_mask, inputs["completion_mask"])
    policy.zero_grad()
    logps = obj.logps(policy, rb)
    old = (logps.detach() + 0.3 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(2))) * mask
    ref = obj.reference_logps(rb) if beta else None
    if beta:
        assert torch.allclose(ref[mask], inputs["ref_per_token_logps"][mask], atol=1e-5)
    advantages = group_advantages(per_row_rewards(tok), G, "group")
    settings = {"epsilon": 0.2, "epsilon_high": 0.28, "loss_type": loss_type, "max_completion_length": MAX_LEN}
    ours = grpo_loss(logps, old, ref, advantages, rb.completion_mask, beta=beta, **settings)
    ours.loss.backward()
    theirs, frame, grads = run_trl_loss(trainer, {**inputs, "old_per_token_logps": old})
    assert torch.allclose(ours.loss, theirs, atol=1e-6), (ours.loss, theirs)
    assert torch.allclose(ours.per_token_loss[mask], frame["per_token_loss"][mask], atol=1e-6)
    for ours_clip, name in ((ours.clip_low, "low"), (ours.clip_high, "high"), (ours.clip_region, "region")):
        assert float(ours_clip) == pytest.approx(last(trainer, f"clip_ratio/{name}_mean"), abs=1e-6)
    assert float(ours.clip_low) > 0 and float(ours.clip_high) > 0 and float(ours.clip_region) < 1
    if beta:
        assert torch.allclose(ours.per_token_kl[mask], frame["per_token_kl"][mask], atol=1e-6)
        assert float(ours.kl_mean) == pytest.approx(last(trainer, "kl"), abs=1e-6)
        assert float(ours.kl_mean) > 1e-3  # the policy is away from the reference
    else:
        assert ours.kl_mean is None and ours.per_token_kl is None
    assert_grads_equal(our_grads(policy), grads)


def per_row_rewards(tok) -> torch.Tensor:
    """The weighted reward of each fixed completion, nan where no function scored it."""
    per_func = FnScorer(tok)({"prompt": PROMPTS}, completions(tok), G)
    rewards = (per_func * torch.tensor(WEIGHTS)).nansum(1)
    rewards[per_func.isnan().all(1)] = math.nan
    return rewards


def assert_grads_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Every LoRA factor's gradient equal to 1e-5, the same factors on both sides, none all zero."""
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * 2 * len(TARGETS)
    for name, g in ours.items():
        assert torch.allclose(g, theirs[name], atol=1e-5, rtol=0), (name, (g - theirs[name]).abs().max())
    assert any(g.abs().max() > 1e-4 for g in ours.values())


@pytest.mark.parametrize(("loss_type", "scale_rewards", "beta"), [("dapo", "group", 0.04), ("grpo", "batch", 0.0)])
def test_objective_equals_trl_step(base, policy, tok, tmp_path, loss_type, scale_rewards, beta):
    """One GRPOObjective call = TRL's generate-score-loss step for the same completions: loss, LoRA gradients and
    every statistic (TRL's metric names and values); the model's modes are as found though the sampler switched
    to eval."""
    trainer = trl_trainer(base, policy, tok, tmp_path, loss_type=loss_type, scale_rewards=scale_rewards, beta=beta)
    theirs, _, grads = run_trl_loss(trainer, trl_inputs(trainer))
    obj = objective(policy, tok, loss_type=loss_type, scale_rewards=scale_rewards, beta=beta)
    modes = [m.training for m in policy.modules()]
    policy.zero_grad()
    out = obj(policy, prompt_batch(tok))
    out.loss.backward()
    assert [m.training for m in policy.modules()] == modes and policy.training
    assert torch.allclose(out.loss, theirs, atol=1e-6), (out.loss, theirs)
    assert_grads_equal(our_grads(policy), grads)
    names = grpo_stats(FnScorer(tok).names)
    assert out.outputs.shape == (len(PROMPTS) * G, len(names)) and out.samples == len(PROMPTS) * G
    assert out.units == int(sum(len(c) for c in completions(tok))) and out.unit == "tokens"
    logged = trainer._metrics["train"]
    for k, name in enumerate(names):
        if name == "kl" and not beta:
            assert name not in logged and float(out.outputs[0, k]) == 0.0  # no reference pass, as in TRL
            continue
        assert float(out.outputs[0, k]) == pytest.approx(logged[name][-1], abs=1e-5), name
    assert (out.outputs == out.outputs[0]).all()  # batch statistics, on every row


def fit_grpo(policy, tok, seed: int, tmp_path=None):
    """A 2-step lorakit Trainer run of GRPO (beta > 0) on a copy of `policy`, with a validation pass; its
    metrics.jsonl rows when given a directory."""
    model = copy.deepcopy(policy)
    modes = []
    model.register_forward_pre_hook(lambda m, args: modes.append((torch.is_grad_enabled(), m.training)))
    obj = objective(model, tok, beta=0.04)
    cfg = TrainConfig(epochs=1, device="cpu", seed=seed, log_every=1, lr=0.01)
    trainer = Trainer(
        model, cfg, objective=obj, metrics=grpo_metrics(obj.scorer.names), callbacks=[], artifact_dir=tmp_path
    )
    trainer.fit([prompt_batch(tok)] * 2, [prompt_batch(tok)])
    rows = trainer.artifacts.rows() if trainer.artifacts else []
    return obj.sampler.seeds, modes, rows


def test_objective_trains_under_the_trainer_with_trls_metric_names_and_seeds_from_the_global_rng(policy, tok, tmp_path):
    seeds, modes, rows = fit_grpo(policy, tok, 7, tmp_path / "a")
    again, _, _ = fit_grpo(policy, tok, 7)
    other, _, _ = fit_grpo(policy, tok, 8)
    assert len(seeds) == 3 and seeds == again and seeds != other  # 2 training batches, 1 validation batch
    grad_modes = {training for grad, training in modes if grad}
    assert grad_modes == {True}  # every gradient pass ran in train mode, after the sampler switched to eval
    names = grpo_stats(FnScorer(tok).names)
    steps = [r for r in rows if r["kind"] == "step"]
    assert len(steps) == 2 and all(set(names) <= set(r) for r in steps)
    epoch = next(r for r in rows if r["kind"] == "epoch")
    assert all(f"valid_{n}" in epoch for n in names) and epoch["valid_kl"] > 0


class _Rows:
    """A sampler returning whatever rows it is given (for the bad-input checks)."""

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows

    def __call__(self, prompts: list[list[int]], n: int, seed: int) -> list[list[int]]:
        return self.rows


class _Shape:
    """A scorer returning a tensor of the wrong shape."""

    names, weights = ("a",), (1.0,)

    def __call__(self, batch, rows: list[list[int]], n: int) -> torch.Tensor:
        return torch.zeros(len(rows), 2)


def test_bad_sampler_scorer_and_loss_inputs_are_refused_by_name(policy, tok):
    obj = objective(policy, tok)
    batch, eos = prompt_batch(tok), tok.eos_token_id
    cases = [
        (_Rows([[eos]] * 3), FnScorer(tok), "the sampler returned 3 completions for 2 prompts × 4"),
        (_Rows([[5] * (MAX_LEN + 1)] * 8), FnScorer(tok), "completions of 7 tokens: max_completion_length=6"),
        (_Rows([[eos]] * 8), _Shape(), r"the scorer returned \(8, 2\): expected a Tensor of shape \(8, 1\)"),
    ]
    for sampler, scorer, message in cases:
        bad = GRPOObjective(policy, obj.config, sampler, scorer, pad_id=tok.pad_token_id, eos_id=eos)
        with pytest.raises(ValueError, match=message):
            bad(policy, batch)
    logps, adv = torch.zeros(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match=r"beta=0.1 needs ref_per_token_logps of shape \(2, 3\); got None"):
        grpo_loss(logps, logps, None, adv, torch.ones(2, 3), beta=0.1)
    with pytest.raises(ValueError, match=r"advantages \(3,\) must be \(N,\) = \(2,\)"):
        grpo_loss(logps, logps, None, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="scale_rewards='mean' is invalid"):
        group_advantages(adv, 2, "mean")
