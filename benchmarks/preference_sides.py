"""The four training sides of benchmarks/preference.py, each run in its own fresh process (its peak RSS is that
process's): lorakit DPO, TRL DPO, lorakit GRPO, TRL GRPO. Each prints one JSON line of step-end times and tokens.

    python benchmarks/preference_sides.py SIDE ROOT SETTINGS_JSON

Steps are timed from the end of optimizer step `warmup` to the end of the last step; tokens are what the batches
carried (DPO: attention tokens of the chosen + rejected rows; GRPO: completion tokens), counted in the collate
function of each side (one collate per step, in order).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import TARGETS  # noqa: E402


def _model_and_tokenizer(root: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(root / "model"), AutoTokenizer.from_pretrained(root / "model")


def _rows(root: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / name).read_text().splitlines() if line.strip()]


def _lorakit_model(model: Any, s: dict[str, Any]) -> Any:
    import lorakit as lk

    return lk.apply_lora(model, lk.LoraConfig(rank=s["rank"], alpha=2 * s["rank"], dropout=0.0), TARGETS)


def _peft_config(s: dict[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=s["rank"], lora_alpha=2 * s["rank"], lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )


def _counting(collate: Any, tokens: list[int], key: str) -> Any:
    """`collate` that appends each batch's token count (the sum of batch[key]) to `tokens`."""

    def counted(rows: list[Any]) -> Any:
        batch = collate(rows)
        tokens.append(int(batch[key].sum()))
        return batch

    return counted


def _train_config(s: dict[str, Any], steps: int) -> Any:
    from lorakit.train import TrainConfig

    return TrainConfig(
        max_steps=steps, lr=s["lr"], schedule="linear", weight_decay=0.0, device="cpu", seed=0, log_every=1
    )


def _step_ends(ends: list[float]) -> Any:
    """A lorakit Trainer callback that records the time of every logged step (log_every=1: each step)."""
    from lorakit.train.events import StepLogged

    def record(event: object) -> None:
        if isinstance(event, StepLogged):
            ends.append(time.perf_counter())

    return record


def _trl_step_ends(ends: list[float]) -> Any:
    from transformers import TrainerCallback

    class StepEnds(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            ends.append(time.perf_counter())

    return StepEnds()


def _trl_args(s: dict[str, Any], root: Path, steps: int) -> dict[str, Any]:
    """What both TRL trainers are told (the rest is TRL's default): the shared lr, steps and precision, no
    checkpoints or reporting, and the same no-checkpointing fp32 CPU setting as lorakit's side."""
    return {
        "output_dir": str(root / "trl-out"),
        "max_steps": steps,
        "learning_rate": s["lr"],
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": 0,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
    }


def lorakit_dpo(root: Path, s: dict[str, Any]) -> dict[str, Any]:
    """DPOObjective in lorakit's Trainer, the frozen reference's log-probs computed once before training."""
    import torch
    from torch.utils.data import DataLoader

    from lorakit.hf.preference_batches import collate_pairs
    from lorakit.train import DPOConfig, DPOObjective, Trainer, dpo_metrics, reference_logps

    model, tok = _model_and_tokenizer(root)
    model = _lorakit_model(model, s)
    cfg = DPOConfig()
    rows = _rows(root, "dpo.jsonl")
    collate = functools.partial(collate_pairs, pad_id=tok.pad_token_id)
    t = time.perf_counter()
    refs = reference_logps(model, rows, collate, config=cfg, batch_size=s["batch"], device=torch.device("cpu"))
    precompute_s = time.perf_counter() - t
    rows = [{**r, "ref_chosen_logps": c, "ref_rejected_logps": j} for r, (c, j) in zip(rows, refs, strict=True)]
    tokens: list[int] = []
    loader = DataLoader(
        rows, batch_size=s["batch"], shuffle=True, collate_fn=_counting(collate, tokens, "attention_mask")
    )
    ends: list[float] = []
    trainer = Trainer(
        model,
        _train_config(s, s["dpo_steps"]),
        objective=DPOObjective(model, cfg),
        metrics=dpo_metrics(),
        callbacks=[_step_ends(ends)],
    )
    trainer.fit(loader)
    return {"ends": ends, "tokens": tokens, "precompute_s": precompute_s}


def trl_dpo(root: Path, s: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer with its PEFT adapter and TRL's defaults (the reference: the adapter disabled, each step)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tok = _model_and_tokenizer(root)
    data = Dataset.from_list(_rows(root, "dpo-text.jsonl"))
    args = DPOConfig(**_trl_args(s, root, s["dpo_steps"]), per_device_train_batch_size=s["batch"])
    ends: list[float] = []
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=_peft_config(s),
        callbacks=[_trl_step_ends(ends)],
    )
    tokens: list[int] = []
    trainer.data_collator = _counting(trainer.data_collator, tokens, "attention_mask")
    trainer.train()
    return {"ends": ends, "tokens": tokens, "precompute_s": 0.0}


def trl_exact_match(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """TRL's reward-function form of exact match (whitespace-normalised equality), as lorakit's built-in scores."""
    return [float(" ".join(c.split()) == " ".join(a.split())) for c, a in zip(completions, answer, strict=True)]


def lorakit_grpo(root: Path, s: dict[str, Any]) -> dict[str, Any]:
    """GRPOObjective in lorakit's Trainer, rollouts from the serving engine on the live adapter."""
    from torch.utils.data import DataLoader

    from lorakit.align.rewards import RewardScorer
    from lorakit.align.rollouts import EngineSampler
    from lorakit.hf.preference_batches import collate_prompts
    from lorakit.train import GRPOConfig, GRPOObjective, Trainer, grpo_metrics

    model, tok = _model_and_tokenizer(root)
    model = _lorakit_model(model, s)
    cfg = GRPOConfig(num_generations=s["generations"], max_completion_length=s["new_tokens"])
    sampler = EngineSampler(
        model,
        tok,
        max_new_tokens=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
    )
    scorer = RewardScorer(tok, cfg.rewards, cfg.weights)
    objective = GRPOObjective(model, cfg, sampler, scorer, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    rows = [
        {"prompt_ids": r["prompt_ids"], "prompt": r["prompt"], "answer": r["answer"]} for r in _rows(root, "grpo.jsonl")
    ]
    collate = functools.partial(collate_prompts, pad_id=tok.pad_token_id)
    loader = DataLoader(rows, batch_size=s["prompts"], shuffle=True, collate_fn=collate)
    ends: list[float] = []
    trainer = Trainer(
        model,
        _train_config(s, s["grpo_steps"]),
        objective=objective,
        metrics=grpo_metrics(scorer.names),
        callbacks=[_step_ends(ends)],
    )
    lengths: list[float] = []
    trainer.callbacks.append(_mean_lengths(lengths))
    trainer.fit(loader)
    return {"ends": ends, "mean_length": lengths}


def _mean_lengths(out: list[float]) -> Any:
    """A lorakit Trainer callback recording each step's mean completion length (GRPO's logged metric)."""
    from lorakit.train.events import StepLogged

    def record(event: object) -> None:
        if isinstance(event, StepLogged):
            out.append(float(event.metrics.get("completions/mean_length", float("nan"))))

    return record


def trl_grpo(root: Path, s: dict[str, Any]) -> dict[str, Any]:
    """TRL's GRPOTrainer with its PEFT adapter and TRL's defaults (transformers generate on CPU)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tok = _model_and_tokenizer(root)
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in _rows(root, "grpo.jsonl")])
    args = GRPOConfig(
        **_trl_args(s, root, s["grpo_steps"]),
        per_device_train_batch_size=s["prompts"] * s["generations"],
        num_generations=s["generations"],
        max_completion_length=s["new_tokens"],
    )
    ends: list[float] = []
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=trl_exact_match,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=_peft_config(s),
        callbacks=[_trl_step_ends(ends)],
    )
    trainer.train()
    lengths = [float(h["completions/mean_length"]) for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"ends": ends, "mean_length": lengths}


SIDES = {"lorakit-dpo": lorakit_dpo, "trl-dpo": trl_dpo, "lorakit-grpo": lorakit_grpo, "trl-grpo": trl_grpo}


def main(argv: list[str]) -> None:
    side, root, settings = argv[0], Path(argv[1]), json.loads(argv[2])
    import torch

    torch.set_num_threads(settings["threads"])
    torch.manual_seed(0)
    print(json.dumps({"side": side, **SIDES[side](root, settings)}))


if __name__ == "__main__":
    main(sys.argv[1:])
