"""benchmarks/e2e.py's Trainer + PEFT side: the usual transformers recipe, run in its own fresh process."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from harness import TARGETS


def hf_side(a: argparse.Namespace, root: Path, compiled: bool) -> None:
    """In this (fresh) process: Trainer + PEFT on root's model and rows; prints one JSON line of timings.

    compiled: TrainingArguments(torch_compile=True): accelerate wraps the whole PeftModel in torch.compile
    (inductor, dynamic=None: a second distinct batch length recompiles it with dynamic shapes).
    """
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(root / "model")
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    model = get_peft_model(
        model,
        LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    ds = load_dataset("json", data_files=str(root / "train.jsonl"), split="train")
    # lorakit's encoding of a text row: the tokenizer's ids + EOS, truncated to max_length (same tokens per row)
    ds = ds.map(
        lambda ex: {"input_ids": (tok(ex["text"])["input_ids"] + [tok.eos_token_id])[: a.max_length]},
        remove_columns=["text"],
    )
    mlm = DataCollatorForLanguageModeling(tok, mlm=False)  # pads to the batch's longest; labels -100 on padding
    tokens: list[int] = []
    lengths: list[int] = []

    def collate(features):
        batch = mlm(features)
        tokens.append(int(batch["attention_mask"].sum()))
        lengths.append(int(batch["input_ids"].shape[1]))
        return batch

    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())  # ends[0]: the loop's start; ends[k]: the end of step k

        def on_step_end(self, args, state, control, **kw):
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(root / "hf-out"),
        per_device_train_batch_size=a.batch,
        max_steps=a.steps,
        logging_steps=a.log_every,
        save_strategy="no",
        report_to=[],
        learning_rate=a.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=1.0,
        seed=0,
        dataloader_num_workers=0,
        use_cpu=not a.device.startswith("cuda"),
        bf16=a.precision == "bf16",
        torch_compile=compiled,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[StepTimes()])
    trainer.train()
    w = a.log_every  # steps 1..w are warm-up; steps w+1..N are counted
    out = {
        "loop_s": ends[-1] - ends[w],
        "warmup_s": ends[w] - ends[0],
        "tokens": sum(tokens[w : len(ends) - 1]),
        "steps": len(ends) - 1,
        "lengths": len(set(lengths[: len(ends) - 1])),
        "step_s": [b - a for a, b in zip(ends, ends[1:], strict=False)],  # each step's time, compiles included
    }
    if compiled:
        from torch._dynamo.utils import compilation_time_metrics, counters

        # dynamo's own records: one _compile.compile_inner entry per frame compiled (the first compile, each
        # recompile, and the frames around a graph break); the backward graph compiles lazily at first backward
        out["dynamo_frames"] = int(counters["frames"]["ok"])
        out["dynamo_compile_s"] = sum(compilation_time_metrics.get("_compile.compile_inner", []))
        out["graph_breaks"] = int(sum(counters["graph_break"].values()))
    print(json.dumps(out))
