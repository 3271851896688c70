"""DPO against its oracle: TRL 1.16's DPOTrainer (and its experimental CPOTrainer for SimPO) on the same tiny Llama,
the same LoRA factors (lorakit's copied into TRL's PEFT model) and the same concatenated batch."""

from __future__ import annotations

import copy
import json
import math
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
from torch.utils.data import DataLoader

import lorakit as lk
from lorakit.train import DPOConfig, DPOObjective, TrainConfig, Trainer, dpo_loss, dpo_metrics, token_logps
from lorakit.train.dpo import DPO_STATS, reference_logps

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
def base64(base) -> torch.nn.Module:
    """The oracle comparisons run the model in float64. TRL's log-probs come from its own chunked LM-head kernel,
    which projects in float32 whatever the model's dtype; lorakit's from the model's logits. In float32 the two
    sum in other orders and their gradients differ by up to ~2e-5 of the largest entry; with a float64 backbone
    what is left (TRL's float32 head) stays well under 1e-5, so a difference of formula could not hide in it."""
    return copy.deepcopy(base).double()


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
def test_loss_rewards_and_grads_equal_trl_with_the_base_as_reference(base64, batch, trl_dir, loss_type):
    model = policy_model(base64)
    want_loss, want_stats, want_grads = trl_step(trl_dpo(base64, model, loss_type, 0.1, None, trl_dir), batch)
    loss, stats, grads = lorakit_step(model, DPOConfig(loss_type=loss_type, beta=0.1), batch)
    torch.testing.assert_close(loss, want_loss.to(loss.dtype), **TOL)
    assert stats == pytest.approx(want_stats, rel=1e-5, abs=1e-5)
    assert want_stats["rewards/margins"] != 0  # the adapter moved the policy off its reference
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[peft_name(name)].to(grad.dtype), **TOL)


def test_step_zero_sigmoid_loss_is_exactly_log_2(base, batch):
    model = lk.apply_lora(copy.deepcopy(base), LORA, targets=TARGETS)  # fresh: B = 0, the policy is the base
    out = DPOObjective(model, DPOConfig(beta=0.1))(model, batch)
    # float32 rounding of log 2: the policy's and the reference's log-probs are bit-identical, so every log-ratio
    # is exactly 0 and -log sigmoid(0) is float32(log 2)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == torch.tensor(math.log(2), dtype=torch.float32).item()
    assert out.outputs[:, DPO_STATS.index("rewards/margins")].eq(0).all()


def with_reference(base: torch.nn.Module, directory: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(lorakit model whose "default" adapter is the policy and frozen "ref" another adapter, the ref's own model)."""
    ref = policy_model(base, seed=2)
    lk.save_adapters(ref, directory)
    model = lk.load_adapters(policy_model(base, seed=1), directory, name="ref")
    assert lk.active_adapter(model) == "default"
    return model, ref


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_rewards_and_grads_equal_trl_with_a_frozen_adapter_as_reference(
    base64, batch, trl_dir, tmp_path, loss_type
):
    model, ref = with_reference(base64, tmp_path)
    trainer = trl_dpo(base64, model, loss_type, 0.1, ref, trl_dir)
    assert "ref" in trainer.model.peft_config  # TRL's reference is then that adapter
    want_loss, want_stats, want_grads = trl_step(trainer, batch)
    loss, stats, grads = lorakit_step(model, DPOConfig(loss_type=loss_type, beta=0.1, reference="ref"), batch)
    torch.testing.assert_close(loss, want_loss.to(loss.dtype), **TOL)
    assert stats == pytest.approx(want_stats, rel=1e-5, abs=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[peft_name(name)].to(grad.dtype), **TOL)
    # the adapter reference is not the base: against the base the rewards differ
    _, base_stats, _ = lorakit_step(model, DPOConfig(loss_type=loss_type, beta=0.1), batch)
    assert base_stats["rewards/chosen"] != pytest.approx(stats["rewards/chosen"], rel=1e-3)


def cpo_batch(rows: list[dict], pad_id: int = PAD) -> dict[str, torch.Tensor]:
    """The same pairs in CPOTrainer's layout: chosen_*/rejected_* (input_ids, attention_mask, labels -100 on the
    prompt and padding)."""
    out = {}
    for key in ("chosen", "rejected"):
        seqs = [r["prompt_ids"] + r[f"{key}_ids"] for r in rows]
        width = max(map(len, seqs))
        ids, labels = torch.full((len(rows), width), pad_id), torch.full((len(rows), width), -100)
        attention = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (r, seq) in enumerate(zip(rows, seqs, strict=True)):
            ids[i, : len(seq)], attention[i, : len(seq)] = torch.tensor(seq), 1
            labels[i, len(r["prompt_ids"]) : len(seq)] = torch.tensor(r[f"{key}_ids"])
        out |= {f"{key}_input_ids": ids, f"{key}_attention_mask": attention, f"{key}_labels": labels}
    return out


def test_simpo_equals_trl_cpo_simpo(base64, batch, trl_dir):
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    model = policy_model(base64)
    args = CPOConfig(
        output_dir=str(trl_dir), report_to=[], use_cpu=True, loss_type="simpo", cpo_alpha=0.0, beta=2.0,
        simpo_gamma=0.5, gradient_checkpointing=False,
    )  # fmt: skip
    data = Dataset.from_dict({"prompt": ["the cat"], "chosen": [" sat"], "rejected": [" ran"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = CPOTrainer(
            model=copy.deepcopy(base64),
            args=args,
            train_dataset=data,
            processing_class=tokenizer(bos=True),
            peft_config=peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, target_modules=TARGETS),
        )
    params = dict(trainer.model.named_parameters())
    with torch.no_grad():
        for name, p in lora_factors(model).items():
            params[peft_name(name)].copy_(p)
    trainer.model.train()
    want_loss, want_metrics = trainer.get_batch_loss_metrics(trainer.model, cpo_batch(ROWS))
    want_loss.backward()
    loss, stats, grads = lorakit_step(model, DPOConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.5), batch)
    torch.testing.assert_close(loss, want_loss.to(loss.dtype), **TOL)
    assert stats == pytest.approx({k: want_metrics[k] for k in DPO_STATS}, rel=1e-5, abs=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, params[peft_name(name)].grad.to(grad.dtype), **TOL)


@pytest.mark.parametrize("reference", [None, "ref"])
def test_precomputed_reference_gives_the_loss_of_the_in_step_reference(base, batch, tmp_path, reference):
    model = with_reference(base, tmp_path)[0] if reference else policy_model(base)
    config = DPOConfig(beta=0.1, reference=reference)
    model.train()
    logps = reference_logps(model, ROWS, collate, config=config, batch_size=2, device=torch.device("cpu"))
    assert model.training and lk.active_adapter(model) == "default"  # mode and adapter restored
    assert all(p.grad is None for p in model.parameters())
    rows = [{**r, "ref_chosen_logps": c, "ref_rejected_logps": j} for r, (c, j) in zip(ROWS, logps, strict=True)]
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    loss, stats, grads = lorakit_step(model, config, collate(rows))
    hook.remove()
    assert len(forwards) == 1  # the policy's pass only: the reference's came with the batch
    want_loss, want_stats, want_grads = lorakit_step(model, config, batch)
    # other batches (2 pairs, then 1) pad to other widths: equal up to float32 rounding
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    assert stats == pytest.approx(want_stats, rel=1e-5, abs=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-7)


def pairs(n: int, seed: int) -> list[dict]:
    """`n` random pairs: a prompt, then a chosen completion of even tokens and a rejected one of odd tokens."""
    g = torch.Generator().manual_seed(seed)

    def tokens(k: int, parity: int) -> list[int]:
        return (torch.randint(2, 50, (k,), generator=g) * 2 + parity).tolist()

    return [{"prompt_ids": tokens(3, 0), "chosen_ids": tokens(4, 0), "rejected_ids": tokens(4, 1)} for _ in range(n)]


def test_trainer_runs_the_objective_raises_the_rewards_and_logs_trl_names(base, tmp_path):
    model = lk.apply_lora(copy.deepcopy(base), LORA, targets=TARGETS)
    loader = DataLoader(pairs(6, seed=3), batch_size=2, collate_fn=collate)
    trainer = Trainer(
        model,
        TrainConfig(epochs=2, lr=1e-2, log_every=1, device="cpu"),
        objective=DPOObjective(model, DPOConfig(beta=0.1)),
        metrics=dpo_metrics(),
        artifact_dir=tmp_path,
        callbacks=[],
    )
    trainer.fit(loader, loader)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(steps) == 6 and all(name in steps[0] for name in DPO_STATS)
    # step 1 scores the fresh adapter (policy = reference): no reward, no accuracy, loss log 2
    assert steps[0]["rewards/margins"] == 0 and steps[0]["rewards/accuracies"] == 0
    assert steps[0]["loss"] == pytest.approx(math.log(2))
    assert steps[-1]["rewards/margins"] > 0 and steps[-1]["rewards/accuracies"] == 1
    assert epochs[-1]["valid_rewards/accuracies"] == 1 and epochs[-1]["valid_rewards/margins"] > 0
    assert epochs[-1]["valid_rewards/chosen"] > epochs[-1]["valid_rewards/rejected"]
    assert epochs[-1]["valid_loss"] < math.log(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logps_equal_log_softmax(dtype, temperature):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=g) * 4).to(dtype).requires_grad_()
    ids = torch.randint(0, 11, (3, 5), generator=g)
    got = token_logps(logits, ids, temperature=temperature)
    want = torch.log_softmax(logits.float()[:, :-1] / temperature, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert got.dtype == torch.float32 and got.shape == (3, 4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    (g1,) = torch.autograd.grad(got.sum(), logits)
    (g2,) = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(g1, g2)


def test_bad_inputs_name_what_was_expected():
    b = torch.zeros(2)
    with pytest.raises(ValueError, match=r"shapes \[\(2,\), \(3,\)"):
        dpo_loss(b, torch.zeros(3), b, b, beta=0.1)
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        dpo_loss(b, b, None, None, beta=0.1)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        dpo_loss(b, b, b, b, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="loss_type='kto'"):
        dpo_loss(b, b, b, b, beta=0.1, loss_type="kto")
    objective = DPOObjective(torch.nn.Identity(), DPOConfig())
    with pytest.raises(ValueError, match=r"missing \['completion_mask'\]"):
        objective(torch.nn.Identity(), {"input_ids": torch.zeros(2, 3), "attention_mask": torch.ones(2, 3)})
    odd = {k: torch.zeros(3, 4, dtype=torch.long) for k in ("input_ids", "attention_mask", "completion_mask")}
    with pytest.raises(ValueError, match=r"input_ids \(3, 4\): expected \(2B, T\)"):
        objective(torch.nn.Identity(), odd)
    with pytest.raises(TypeError, match="DPOConfig"):
        DPOObjective(torch.nn.Identity(), {"beta": 0.1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"logits \(2, 3\) and input_ids \(2, 3\)"):
        token_logps(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
