"""DPO against its oracle: TRL 1.16's DPOTrainer (and its experimental CPOTrainer for SimPO) on the same tiny Llama,
the same LoRA factors (lorakit's copied into TRL's PEFT model) and the same concatenated batch."""

from __future__ import annotations

import copy
import math
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch

import lorakit as lk
from lorakit.train import DPOConfig, DPOObjective
from lorakit.train.dpo import DPO_STATS

sys.path.insert(0, str(Path(__file__).parents[1]))
from _hf_models import tokenizer  # noqa: E402
from _tiny_models import llama  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # not lm_head: TRL refuses it
LORA = lk.LoraConfig(rank=4, alpha=8)
PAD = 0  # tokenizer()'s "<pad>"
# (prompt, chosen, rejected) token ids of three pairs, lengths all different so that padding and masks matter
ROWS = [
    {"prompt_ids": [2, 4, 18], "chosen_ids": [39, 31, 4, 29, 3], "rejected_ids": [37, 25, 3]},
    {"prompt_ids": [2, 7, 8, 9, 10], "chosen_ids": [11, 3], "rejected_ids": [12, 13, 14, 15, 3]},
    {"prompt_ids": [2, 20], "chosen_ids": [21, 22, 23, 3], "rejected_ids": [24, 25, 26, 27, 28, 3]},
]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def collate(rows: list[dict], pad_id: int = PAD) -> dict[str, torch.Tensor]:
    """The contract's `collate_pairs` layout, built here by hand: rows 0..B-1 prompt + chosen, B..2B-1 prompt +
    rejected, right-padded; completion_mask 1 on completion tokens only."""
    seqs = [(r["prompt_ids"], r[k]) for k in ("chosen_ids", "rejected_ids") for r in rows]
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    attention = torch.zeros(len(seqs), width, dtype=torch.long)
    completion = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention[i, : len(p) + len(c)] = 1
        completion[i, len(p) : len(p) + len(c)] = 1
    out = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    if "ref_chosen_logps" in rows[0]:
        out["ref_chosen_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows], dtype=torch.float32)
        out["ref_rejected_logps"] = torch.tensor([r["ref_rejected_logps"] for r in rows], dtype=torch.float32)
    return out


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-zero values in every LoRA factor (B = 0 would make the policy its reference)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def lora_factors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """lorakit's trainable LoRA factors by name (`model.layers.0.self_attn.q_proj.lora_A`)."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}


def peft_name(name: str, adapter: str = "default") -> str:
    """The PEFT parameter holding lorakit's factor `name` in `adapter`."""
    return f"base_model.model.{name}.{adapter}.weight"


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return llama()


@pytest.fixture(scope="module")
def trl_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trl")


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return collate(ROWS)


def trl_dpo(
    base: torch.nn.Module, policy: torch.nn.Module, loss_type: str, beta: float, ref: torch.nn.Module | None, out: Path
):
    """TRL's DPOTrainer on a PEFT copy of `base` whose "default" adapter holds `policy`'s factors, and (`ref` given)
    a frozen adapter "ref" holding `ref`'s (TRL's convention for a re-trained adapter's reference)."""
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    args = TRLDPOConfig(
        output_dir=str(out),
        report_to=[],
        use_cpu=True,
        beta=beta,
        loss_type=[loss_type],
        precompute_ref_log_probs=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=len(ROWS),
    )
    data = Dataset.from_dict({"prompt": ["the cat"], "chosen": [" sat"], "rejected": [" ran"]})  # only for __init__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=copy.deepcopy(base),
            args=args,
            train_dataset=data,
            processing_class=tokenizer(bos=True),
            peft_config=peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, target_modules=TARGETS),
        )
        model = trainer.model
        if ref is not None:
            model.add_adapter("ref", peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, target_modules=TARGETS))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in lora_factors(policy).items():
            params[peft_name(name)].copy_(p)
        for name, p in lora_factors(ref).items() if ref is not None else ():
            params[peft_name(name, "ref")].copy_(p)
    model.set_adapter("default")
    model.train()
    return trainer


def trl_step(trainer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """TRL's loss of `batch` (its own `_compute_loss`), the metrics it logged, and the "default" adapter's grads."""
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, {k: v.clone() for k, v in batch.items()}, False)
    loss.backward()
    logged = {name: trainer._metrics["train"][name][-1] for name in DPO_STATS}
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if ".default." in n}
    return loss.detach(), logged, grads


def lorakit_step(model: torch.nn.Module, config: DPOConfig, batch: dict[str, torch.Tensor]):
    """lorakit's loss of `batch` through DPOObjective, its per-stat means, and the LoRA grads."""
    model.zero_grad()
    model.train()
    out = DPOObjective(model, config)(model, batch)
    out.loss.backward()
    stats = dict(zip(DPO_STATS, out.outputs.mean(dim=0).tolist(), strict=True))
    return out.loss.detach(), stats, {n: p.grad for n, p in lora_factors(model).items()}


def policy_model(base: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """lorakit's LoRA on a copy of `base`, factors random."""
    return randomise(lk.apply_lora(copy.deepcopy(base), LORA, targets=TARGETS), seed)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_rewards_and_grads_equal_trl_with_the_base_as_reference(base, batch, trl_dir, loss_type):
    model = policy_model(base)
    want_loss, want_stats, want_grads = trl_step(trl_dpo(base, model, loss_type, 0.1, None, trl_dir), batch)
    loss, stats, grads = lorakit_step(model, DPOConfig(loss_type=loss_type, beta=0.1), batch)
    torch.testing.assert_close(loss, want_loss, **TOL)
    assert stats == pytest.approx(want_stats, rel=1e-5, abs=1e-5)
    assert want_stats["rewards/margins"] != 0  # the adapter moved the policy off its reference
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[peft_name(name)], **TOL)


def test_step_zero_sigmoid_loss_is_exactly_log_2(base, batch):
    model = lk.apply_lora(copy.deepcopy(base), LORA, targets=TARGETS)  # fresh: B = 0, the policy is the base
    out = DPOObjective(model, DPOConfig(beta=0.1))(model, batch)
    # float32 rounding of log 2: the policy's and the reference's log-probs are bit-identical, so every log-ratio
    # is exactly 0 and -log sigmoid(0) is float32(log 2)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == torch.tensor(math.log(2), dtype=torch.float32).item()
    assert out.outputs[:, DPO_STATS.index("rewards/margins")].eq(0).all()
