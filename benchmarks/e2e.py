"""End to end against what users run: `lorakit finetune` vs transformers `Trainer` + PEFT; writes RESULTS-e2e.md.

    .venv/bin/python benchmarks/e2e.py                  # the benchmark model, 3 repetitions a side (about 4 min)
    .venv/bin/python benchmarks/e2e.py --quick --out /tmp/e2e.md   # a tiny model, seconds (the test uses this)
    .venv/bin/python benchmarks/e2e.py --device cuda --threads 8

Both sides get the same saved model directory (a Llama-style model from a transformers config, random seeded
weights, and a WordLevel tokenizer saved with it), the same JSONL rows (lengths from 3/4 to 5/4 of max length:
about half are truncated and the rest padded to their batch's longest, on both sides), the same LoRA config
(r8, alpha16, dropout 0, q/k/v/o/gate/up/down), batch size, max length, steps, lr (linear schedule, no warmup),
AdamW (weight decay 0), gradient clipping at 1.0, logging every --log-every steps, no evaluation while training,
no checkpoint while training. Each side runs in its own fresh subprocess (its peak RSS is that process's
ru_maxrss from wait4), and repetitions interleave: lorakit, Trainer, lorakit, Trainer...

Loop time: the wall time from the end of optimizer step --log-every to the end of step --steps (the first
--log-every steps are warm-up and not counted). lorakit: the `elapsed_s` of the step rows in OUT/run/metrics.jsonl
(written with --log-every, taken right after the optimizer step). Trainer: a TrainerCallback's `on_step_end`
perf_counter. Tokens: the real (attention-mask) tokens of the counted steps; lorakit's rows carry them as
throughput x interval, the Trainer side counts them in its collator (num_workers 0, one collate per step).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from e2e_report import report  # noqa: E402
from harness import TARGETS  # noqa: E402
from run import add_model_args  # noqa: E402

HERE = Path(__file__).resolve().parent
FLOORS = {  # what each side imports before it has a model: the resident floor under its peak
    "lorakit finetune": "import lorakit.cli, lorakit.cli.finetune, lorakit.hf.finetune, lorakit.train",
    "Trainer + PEFT": "import datasets, peft, transformers; from transformers import Trainer, AutoModelForCausalLM",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)  # the benchmark model's size and rank, as every suite takes them
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rows", type=int, default=400, help="training rows (lengths drawn from max-length/4 to 1.25x)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--log-every", type=int, default=4, help="both sides log every N steps; the first N are warm-up")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions per side")
    p.add_argument("--threads", type=int, default=1, help="OMP/torch threads of each side's process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="a tiny model, few steps, one repetition (for tests)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS-e2e.md")
    p.add_argument("--hf-side", type=Path, help=argparse.SUPPRESS)  # internal: run the Trainer side on this dir
    a = p.parse_args(argv)
    a.command = "".join(f" {x}" for x in (sys.argv[1:] if argv is None else argv) if not x.startswith("--hf-side"))
    if a.quick:
        a.hidden, a.intermediate, a.layers, a.heads, a.vocab = 32, 64, 2, 2, 128
        a.batch, a.max_length, a.rows, a.steps, a.log_every, a.reps = 2, 32, 40, 6, 2, 1
    return a


# -- the shared setup: model directory and data ---------------------------------------------------------------


def prepare(a: argparse.Namespace, root: Path) -> tuple[Path, Path, Path]:
    """Save the model + tokenizer to root/model, the rows to root/train.jsonl and 2 rows to root/valid.jsonl."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    words = [f"w{i}" for i in range(a.vocab - len(specials))]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    cfg = LlamaConfig(
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.heads,
        vocab_size=a.vocab,
        max_position_embeddings=max(2048, a.max_length),
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    model_dir = root / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    rng = random.Random(0)

    def row() -> str:  # varied lengths: about half the rows are truncated, the others padded in their batch
        n = rng.randint(max(2, a.max_length * 3 // 4), a.max_length * 5 // 4)
        return json.dumps({"text": " ".join(rng.choice(words) for _ in range(n))})

    train, valid = root / "train.jsonl", root / "valid.jsonl"
    train.write_text("\n".join(row() for _ in range(a.rows)) + "\n")
    valid.write_text("\n".join(row() for _ in range(2)) + "\n")
    return model_dir, train, valid


def side_env(a: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="0")
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# A small parent between this process and each side: Linux keeps, in a process's peak RSS (ru_maxrss), the
# high-water mark of the memory image it had before exec, and a child forked or vforked from this process
# (which holds torch and the model) would start with ours. Spawned from this small interpreter, it starts near 0.
SPAWN = """import json, os, subprocess, sys
with open(sys.argv[2], "w") as log:
    p = subprocess.Popen(sys.argv[3:], stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(p.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "maxrss": usage.ru_maxrss * 1024}, f)
"""


def run_process(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, int]:
    """Run `cmd` to its end; (wall seconds, peak RSS bytes of that process: ru_maxrss from wait4)."""
    t = time.perf_counter()
    facts = log.with_suffix(".rusage.json")
    subprocess.run([sys.executable, "-S", "-c", SPAWN, str(facts), str(log), *cmd], env=env, check=True)
    wall = time.perf_counter() - t
    r = json.loads(facts.read_text())
    if r["rc"] != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({r['rc']}):\n{log.read_text()[-3000:]}")
    return wall, r["maxrss"]


# -- lorakit: the real CLI ----------------------------------------------------------------------------------


def run_lorakit(a: argparse.Namespace, root: Path, rep: int) -> dict:
    model_dir, train, valid = root / "model", root / "train.jsonl", root / "valid.jsonl"
    out = root / f"lk-{rep}"
    cmd = [
        sys.executable,
        "-m",
        "lorakit",
        "finetune",
        "--model",
        str(model_dir),
        "--data",
        str(train),
        "--valid",
        str(valid),
        "--task",
        "causal-lm",
        "--out",
        str(out),
        "--targets",
        *TARGETS,
        "--rank",
        str(a.rank),
        "--alpha",
        str(2 * a.rank),
        "--dropout",
        "0",
        "--lr",
        str(a.lr),
        "--batch-size",
        str(a.batch),
        "--max-length",
        str(a.max_length),
        "--schedule",
        "linear",
        "--weight-decay",
        "0",
        "--device",
        a.device,
        "--seed",
        "0",
        "--log-every",
        str(a.log_every),
        "--plain",
        "--max-steps",
        str(a.steps),
    ]
    wall, rss = run_process(cmd, side_env(a), root / f"lk-{rep}.log")
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert steps[0]["throughput_unit"] == "tokens", steps[0]
    counted = [(prev, r) for prev, r in zip(steps, steps[1:], strict=False) if r["step"] > a.log_every]
    loop = steps[-1]["elapsed_s"] - next(r for r in steps if r["step"] == a.log_every)["elapsed_s"]
    tokens = sum(round(r["throughput"] * (r["elapsed_s"] - prev["elapsed_s"])) for prev, r in counted)
    return {"loop_s": loop, "tokens": tokens, "rss": rss, "wall_s": wall, "steps": steps[-1]["step"]}


# -- transformers Trainer + PEFT: the usual recipe -------------------------------------------------------------


def hf_side(a: argparse.Namespace, root: Path) -> None:
    """In this (fresh) process: Trainer + PEFT on root's model and rows; prints one JSON line of timings."""
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

    def collate(features):
        batch = mlm(features)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    ends: list[float] = []

    class StepTimes(TrainerCallback):
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
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[StepTimes()])
    trainer.train()
    w = a.log_every  # steps 1..w are warm-up; steps w+1..N are counted
    print(json.dumps({"loop_s": ends[-1] - ends[w - 1], "tokens": sum(tokens[w : len(ends)]), "steps": len(ends)}))


def run_hf(a: argparse.Namespace, root: Path, rep: int, argv: list[str]) -> dict:
    """The Trainer side in a fresh process (this file with --hf-side): its timings, peak RSS and wall time."""
    log = root / f"hf-{rep}.log"
    wall, rss = run_process([sys.executable, __file__, *argv, "--hf-side", str(root)], side_env(a), log)
    line = next(x for x in reversed(log.read_text().splitlines()) if x.startswith('{"loop_s"'))
    return {**json.loads(line), "rss": rss, "wall_s": wall}


# -- the report ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.hf_side:
        hf_side(a, a.hf_side)
        return a.hf_side
    keys = (
        "hidden",
        "intermediate",
        "layers",
        "heads",
        "vocab",
        "rank",
        "batch",
        "max_length",
        "rows",
        "steps",
        "log_every",
        "lr",
        "threads",
        "device",
    )
    side_argv = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in keys]  # the settings after --quick's
    load_start, t0 = harness.loadavg(), time.perf_counter()
    results: dict[str, list[dict]] = {"lorakit finetune": [], "Trainer + PEFT": []}
    with tempfile.TemporaryDirectory(prefix="lorakit-e2e-") as tmp:
        root = Path(tmp)
        prepare(a, root)
        for rep in range(a.reps):
            order = ["lorakit finetune", "Trainer + PEFT"] if rep % 2 == 0 else ["Trainer + PEFT", "lorakit finetune"]
            for side in order:
                r = run_lorakit(a, root, rep) if side == "lorakit finetune" else run_hf(a, root, rep, side_argv)
                results[side].append(r)
                print(f"rep {rep} {side}: {r}", file=sys.stderr)
        floors = {
            k: run_process([sys.executable, "-c", code], side_env(a), root / f"floor-{i}.log")[1]
            for i, (k, code) in enumerate(FLOORS.items())
        }
    text = report(a, results, floors, load_start, harness.loadavg(), time.perf_counter() - t0)
    a.out.write_text(text)
    print(text)
    return a.out


if __name__ == "__main__":
    main()
