"""Preference and RL fine-tuning with LoRA: lorakit against TRL 1.16 + PEFT on CPU; writes RESULTS-preference.md.

    .venv/bin/python benchmarks/preference.py                 # the benchmark model, 3 repetitions a side (minutes)
    .venv/bin/python benchmarks/preference.py --quick --no-rss --out /tmp/p.md   # a tiny model, seconds (tests)

Both sides get the same saved model directory (a Llama from a transformers config, random seeded weights, a
WordLevel tokenizer saved with it), the same rows, the same LoRA config (r8, alpha 16, dropout 0 on
q/k/v/o/gate/up/down), batch size, lr (linear schedule), fp32, no gradient checkpointing and one torch thread;
everything else is each library's default (TRL's bf16 and gradient checkpointing defaults are turned off so that
both sides run the same arithmetic).

- DPO: lorakit's DPOObjective in its Trainer, the reference log-probs computed once and cached in the rows (the
  reference is the base with the adapter off, frozen), against TRL's DPOTrainer + PEFT, whose default computes the
  reference (adapter disabled) in every step. Training tokens/s (attention tokens of the chosen and rejected rows,
  steps after the warm-up) and each side's peak RSS: each side runs in its own fresh process, repetitions
  interleaved (lorakit, TRL, TRL, lorakit, ...).
- GRPO, G generations of up to N new tokens per prompt: rollout tokens/s of lorakit's EngineSampler (the serving
  engine's continuous batching) against TRL's generation as GRPOTrainer runs it on CPU (its own
  `_generate_single_turn`: transformers `generate` on the left-padded prompts, each repeated G times), in this
  process, interleaved and repeated; and the whole training step (rollouts, rewards, log-probs, backward, AdamW)
  of lorakit's GRPOObjective against a TRL GRPOTrainer step, each side in its own process.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import preference_sides as sides  # noqa: E402
from e2e import run_process, side_env  # noqa: E402
from preference_report import report  # noqa: E402
from run import add_model_args  # noqa: E402

HERE = Path(__file__).resolve().parent
SETTINGS = ("rank", "batch", "lr", "dpo_steps", "grpo_steps", "prompts", "generations", "new_tokens", "threads")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.set_defaults(hidden=256, intermediate=688, layers=4, heads=4, vocab=2048)
    p.add_argument("--batch", type=int, default=4, help="DPO preference pairs per step")
    p.add_argument("--pairs", type=int, default=64, help="DPO rows")
    p.add_argument("--dpo-steps", type=int, default=12)
    p.add_argument("--grpo-steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="steps of each side not counted")
    p.add_argument("--prompts", type=int, default=2, help="GRPO prompts per step")
    p.add_argument("--generations", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="the most new tokens a completion may have")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each training side")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the rollout cases")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-rss", action="store_true", help="run the training sides in this process (no peak RSS)")
    p.add_argument("--quick", action="store_true", help="a tiny model, few steps, one repetition (for tests)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS-preference.md")
    a = p.parse_args(argv)
    a.command = "".join(f" {x}" for x in (sys.argv[1:] if argv is None else argv))
    if a.quick:
        a.hidden, a.intermediate, a.layers, a.heads, a.vocab = 32, 64, 2, 2, 128
        a.pairs, a.dpo_steps, a.grpo_steps, a.warmup, a.new_tokens, a.reps, a.rounds = 8, 3, 2, 1, 8, 1, 2
        a.prompts = 1
    a.warmup = min(a.warmup, a.dpo_steps - 1, a.grpo_steps - 1)
    return a


# -- the shared setup: model directory and rows ------------------------------------------------------------


def save_model(a: argparse.Namespace, root: Path) -> Any:
    """Save a seeded random Llama and a WordLevel tokenizer (words w0..wN) to root/model; return the tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(a.vocab - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
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
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    return fast


def write_rows(a: argparse.Namespace, root: Path, tok: Any) -> None:
    """DPO rows as text (TRL's input) and encoded as TRL encodes them (lorakit's); GRPO prompt rows."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(a.vocab - 4)]

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    pairs = [
        {"prompt": text(16, 32), "chosen": " " + text(16, 48), "rejected": " " + text(16, 48)} for _ in range(a.pairs)
    ]
    encoded = []
    for r in pairs:  # TRL's non-conversational encoding: EOS appended to each completion, split after the prompt
        prompt = tok(r["prompt"])["input_ids"]
        chosen, rejected = (
            tok(r["prompt"] + r[k] + tok.eos_token)["input_ids"][len(prompt) :] for k in ("chosen", "rejected")
        )
        encoded.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    prompts = [{"prompt": text(16, 32), "answer": text(2, 4)} for _ in range(8 * a.prompts)]
    grpo = [{**r, "prompt_ids": tok(r["prompt"])["input_ids"]} for r in prompts]
    for name, rows in (("dpo-text.jsonl", pairs), ("dpo.jsonl", encoded), ("grpo.jsonl", grpo)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


# -- the training sides: each in its own process --------------------------------------------------------------


def run_side(a: argparse.Namespace, side: str, root: Path, rep: int) -> dict[str, Any]:
    """One training side: its step-end times and tokens, and its process's peak RSS (None with --no-rss)."""
    settings = {k: getattr(a, k) for k in SETTINGS}
    if a.no_rss:
        return {**sides.SIDES[side](root, settings), "rss": None}
    log = root / f"{side}-{rep}.log"
    cmd = [sys.executable, str(HERE / "preference_sides.py"), side, str(root), json.dumps(settings)]
    _, rss = run_process(cmd, side_env(a), log)
    line = next(x for x in reversed(log.read_text().splitlines()) if x.startswith('{"side"'))
    return {**json.loads(line), "rss": rss}


def training(a: argparse.Namespace, root: Path, pairs: list[tuple[str, str]]) -> dict[str, list[dict[str, Any]]]:
    """Every repetition of every side of `pairs`, interleaved (A B, B A, A B, ...)."""
    out: dict[str, list[dict[str, Any]]] = {s: [] for pair in pairs for s in pair}
    for rep in range(a.reps):
        for pair in pairs:
            for side in pair if rep % 2 == 0 else pair[::-1]:
                out[side].append(run_side(a, side, root, rep))
                print(f"rep {rep} {side}: done", file=sys.stderr)
    return out


# -- rollouts: both samplers in this process, interleaved ---------------------------------------------------


def trl_generator(a: argparse.Namespace, root: Path) -> Any:
    """A TRL GRPOTrainer (PEFT adapter, TRL's defaults) whose own CPU generation path the rollouts time."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tok = sides._model_and_tokenizer(root)
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in sides._rows(root, "grpo.jsonl")]
    settings = {k: getattr(a, k) for k in SETTINGS}
    args = GRPOConfig(
        **sides._trl_args(settings, root, 1),
        per_device_train_batch_size=a.prompts * a.generations,
        num_generations=a.generations,
        max_completion_length=a.new_tokens,
    )
    return GRPOTrainer(
        model=model,
        reward_funcs=sides.trl_exact_match,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=sides._peft_config(settings),
    )


def rollouts(a: argparse.Namespace, root: Path) -> dict[str, list[float]]:
    """Tokens/s of each sampler per round: G completions of each of the step's prompts, rounds interleaved."""
    import torch

    from lorakit.align.rollouts import EngineSampler

    model, tok = sides._model_and_tokenizer(root)
    model = sides._lorakit_model(model, {"rank": a.rank})
    sampler = EngineSampler(model, tok, max_new_tokens=a.new_tokens, temperature=1.0, top_p=1.0, top_k=0)
    trainer = trl_generator(a, root)
    prompts = [r["prompt_ids"] for r in sides._rows(root, "grpo.jsonl")[: a.prompts]]
    repeated = [p for p in prompts for _ in range(a.generations)]  # GRPOTrainer's layout: each prompt G times
    tokens: dict[str, list[int]] = {"lorakit EngineSampler": [], "TRL generate": []}
    seeds = iter(range(1_000_000))

    def lorakit_case() -> None:
        out = sampler(prompts, a.generations, next(seeds))
        tokens["lorakit EngineSampler"].append(sum(len(c) for c in out))

    def trl_case() -> None:
        torch.manual_seed(next(seeds))
        ids, _ = trainer._generate_single_turn(repeated, None, {}, a.generations)
        tokens["TRL generate"].append(sum(len(c) for c in ids))

    cases = {"lorakit EngineSampler": lorakit_case, "TRL generate": trl_case}
    samples = harness.interleaved(cases, rounds=a.rounds, warmup=1, device="cpu")
    return {n: [t / s for t, s in zip(tokens[n][1:], samples.times[n], strict=True)] for n in cases}


def main(argv: list[str] | None = None) -> Path:
    a = parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    load_start, t0 = harness.loadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lorakit-preference-") as tmp:
        root = Path(tmp)
        write_rows(a, root, save_model(a, root))
        rates = rollouts(a, root)
        runs = training(a, root, [("lorakit-dpo", "trl-dpo"), ("lorakit-grpo", "trl-grpo")])
    text = report(a, rates, runs, load_start, harness.loadavg(), time.perf_counter() - t0)
    a.out.write_text(text)
    print(text)
    return a.out


if __name__ == "__main__":
    main()
