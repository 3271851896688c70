"""GRPO rollouts on CPU: lorakit's EngineSampler against `model.generate` as TRL's GRPOTrainer calls it.

    python benchmarks/rollouts.py                    # the benchmark model of run.py, B=4 prompts x G=8, 64 new tokens
    python benchmarks/rollouts.py --quick            # a tiny model, seconds

`rollout_speed(...)` is what benchmarks/preference.py calls; run alone, this prints one table. Both sides sample
(temperature 1, no top-k/top-p, TRL's defaults) B prompts x G completions of up to 64 new tokens from the same
LoRA weights (lorakit's model and a PEFT copy of it), one torch thread. TRL's side is GRPOTrainer's non-vLLM path
(trl 1.16 `_generate_single_turn`): the prompts repeated G times, left-padded with the pad id, one
`unwrapped_model.generate(input_ids, attention_mask, generation_config=GenerationConfig(max_new_tokens, do_sample,
pad/bos/eos ids, temperature, top_p, top_k, min_p, repetition_penalty, cache_implementation, disable_compile=True))`
under no_grad with the model in train mode, as the trainer leaves it. A side's tokens are the completion tokens up to
and including the first EOS (what GRPO trains on), so a row that ends early is not counted past its end. The sides
run in turn in every round, the order rotating (harness.interleaved); tokens/s are medians over rounds, the ratio
the median of same-round ratios.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from lorakit.align.rollouts import EngineSampler  # noqa: E402


def trl_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    generations: int,
    *,
    new_tokens: int,
    pad_id: int,
    bos_id: int | None,
    eos_ids: Sequence[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> list[list[int]]:
    """The completions GRPOTrainer (trl 1.16, no vLLM) generates for `prompts`: each repeated `generations` times,
    cut after the first EOS as the trainer masks them."""
    from transformers import GenerationConfig

    rows = [torch.tensor(list(p)) for p in prompts for _ in range(generations)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([r.new_full((width - len(r),), pad_id), r]) for r in rows])  # (B*G, P) left-padded
    mask = torch.stack([torch.cat([r.new_zeros(width - len(r)), torch.ones_like(r)]) for r in rows])
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=True,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=list(eos_ids),
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=None,
        repetition_penalty=1.0,
        cache_implementation=None,
        disable_compile=True,
    )
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)  # type: ignore[operator]
    completions = []
    for row in out[:, width:].tolist():
        end = next((k for k, t in enumerate(row) if t in eos_ids), len(row) - 1)
        completions.append(row[: end + 1])
    return completions


def rollout_speed(
    model: torch.nn.Module,
    peft_model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    generations: int = 8,
    new_tokens: int = 64,
    rounds: int = 5,
    warmup: int = 1,
    max_batch: int = 64,
) -> dict[str, float]:
    """Rollout tokens/s of lorakit's EngineSampler (on `model`, lorakit LoRA) and of TRL's generate (on `peft_model`,
    the same weights under PEFT), interleaved; both models in train mode as a trainer holds them.

    Returns {"lorakit_tokens_per_s", "trl_tokens_per_s" (medians over rounds), "ratio" (median same-round
    lorakit/TRL), "lorakit_tokens", "trl_tokens" (per round, medians)}.
    """
    eos_ids = [int(tokenizer.eos_token_id)]
    sampler = EngineSampler(
        model, tokenizer, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0, max_batch=max_batch
    )
    tokens: dict[str, list[int]] = {"lorakit": [], "trl": []}
    seeds = iter(range(10**6))

    def lorakit_case() -> None:
        out = sampler([list(p) for p in prompts], generations, next(seeds))
        tokens["lorakit"].append(sum(len(c) for c in out))

    def trl_case() -> None:
        out = trl_generate(
            peft_model,
            prompts,
            generations,
            new_tokens=new_tokens,
            pad_id=int(tokenizer.pad_token_id),
            bos_id=tokenizer.bos_token_id,
            eos_ids=eos_ids,
        )
        tokens["trl"].append(sum(len(c) for c in out))

    model.train()
    peft_model.train()
    samples = harness.interleaved({"lorakit": lorakit_case, "trl": trl_case}, rounds, warmup, "cpu")
    rate = {n: [t / s for t, s in zip(tokens[n][-rounds:], samples.times[n], strict=True)] for n in tokens}
    median = harness.statistics.median
    return {
        "lorakit_tokens_per_s": median(rate["lorakit"]),
        "trl_tokens_per_s": median(rate["trl"]),
        "ratio": median(a / b for a, b in zip(rate["lorakit"], rate["trl"], strict=True)),
        "lorakit_tokens": median(tokens["lorakit"][-rounds:]),
        "trl_tokens": median(tokens["trl"][-rounds:]),
    }


def _models(a: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    """run.py's benchmark Llama with lorakit LoRA (non-zero B) and a PEFT copy holding the same factors."""
    from run import build_base, build_lorakit, build_peft

    base = build_base(a)
    model = build_lorakit(a, base, 0.0)
    return model, build_peft(a, base, model, 0.0)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Measure and print one table (`--quick`: a tiny model)."""
    from run import add_model_args
    from serve import tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--prompts", type=int, default=4, help="B: prompts per step")
    p.add_argument("--generations", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.hidden, a.intermediate, a.layers, a.heads, a.vocab, a.new, a.rounds = 32, 64, 2, 2, 128, 8, 2
    a.seq, a.device = a.prompt_tokens + a.new, "cpu"
    torch.set_num_threads(a.threads)
    model, peft_model = _models(a)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, a.vocab, (a.prompts, a.prompt_tokens), generator=g).tolist()
    r = rollout_speed(model, peft_model, tokenizer(a.vocab), prompts, generations=a.generations, new_tokens=a.new,
                      rounds=a.rounds)  # fmt: skip
    print(harness.machine("cpu", a.threads))
    print(f"load average {harness.loadavg()}; B={a.prompts} x G={a.generations}, {a.new} new tokens")
    print(
        harness.table(
            ["case", "tokens/round", "tokens/s"],
            [
                ["lorakit EngineSampler", f"{r['lorakit_tokens']:.0f}", f"{r['lorakit_tokens_per_s']:.0f}"],
                ["TRL generate (PEFT)", f"{r['trl_tokens']:.0f}", f"{r['trl_tokens_per_s']:.0f}"],
            ],
        )
    )
    print(f"ratio (median of same-round ratios): {r['ratio']:.2f}x")
    return r


if __name__ == "__main__":
    main()
