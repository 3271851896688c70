"""`lorakit finetune --task dpo|grpo`: the preference and RL flags (TRL's names and meanings), which task takes
each, the config they make, and the metrics the final report prints.

    lorakit finetune --task dpo --model M --data pairs.jsonl --out A --beta 0.1 --loss-type ipo
    lorakit finetune --task grpo --model M --data prompts.jsonl --out A --num-generations 8 --reward exact_match

A flag given for a task that does not read it exits 2 naming it, as does a LoRA flag beside --init-adapter (the
adapter then starts as that file, with its own rank and targets).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..train.align_config import DPO_LOSSES, GRPO_LOSSES, SCALE_REWARDS
from .common import BadInput

DPO, GRPO = ("dpo",), ("grpo",)
BOTH = (*DPO, *GRPO)
# flag dest -> (the config field it sets or None, the tasks that read it)
ALIGN_FLAGS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "beta": ("beta", BOTH),
    "loss_type": ("loss_type", BOTH),
    "simpo_gamma": ("simpo_gamma", DPO),
    "ref_adapter": (None, BOTH),
    "init_adapter": (None, BOTH),
    "num_generations": ("num_generations", GRPO),
    "max_completion_length": ("max_completion_length", GRPO),
    "temperature": ("temperature", GRPO),
    "top_p": ("top_p", GRPO),
    "top_k": ("top_k", GRPO),
    "epsilon": ("epsilon", GRPO),
    "epsilon_high": ("epsilon_high", GRPO),
    "scale_rewards": ("scale_rewards", GRPO),
    "reward": ("rewards", GRPO),
    "reward_weights": ("reward_weights", GRPO),
}
# the LoRA flags --init-adapter refuses (the adapter it names brings its own), with the defaults they have
LORA_FLAGS = ("targets", "target_parameters", "rank", "alpha", "dropout", "rslora", "use_dora", "init", "quantize")


def flag(dest: str) -> str:
    """The command-line spelling of a dest."""
    return "--" + dest.replace("_", "-")


def check(args: argparse.Namespace) -> None:
    """BadInput naming the first preference/RL flag given for a task that does not read it, a loss type of the
    other task, a reference beside SimPO, or a LoRA flag beside --init-adapter."""
    for dest, (_, tasks) in ALIGN_FLAGS.items():
        if getattr(args, dest, None) is not None and args.task not in tasks:
            raise BadInput(f"{flag(dest)} is for --task {' or '.join(tasks)}, not --task {args.task}")
    losses = DPO_LOSSES if args.task == "dpo" else GRPO_LOSSES
    if args.loss_type is not None and args.loss_type not in losses:
        listed = ", ".join(losses)
        raise BadInput(f"--loss-type {args.loss_type} is not a --task {args.task} loss: expected one of {listed}")
    if args.loss_type == "simpo" and args.ref_adapter is not None:
        raise BadInput("--ref-adapter: --loss-type simpo is reference-free; drop one of them")
    if args.init_adapter is not None:
        given = [d for d in LORA_FLAGS if getattr(args, d) != args.parser.get_default(d)]
        if given:
            raise BadInput(
                f"{flag(given[0])}: --init-adapter {args.init_adapter} starts from that adapter, with its own rank, "
                "alpha and targets; drop the LoRA flags or --init-adapter"
            )


def config(args: argparse.Namespace) -> Any:
    """The DPOConfig or GRPOConfig the flags make (None for the other tasks); fields not given keep TRL's defaults,
    and a bad value is a LoraError naming its field (flag_words words it as the flag)."""
    from ..align import job as align_job  # the losses and the serving engine: only when a run starts

    if args.task not in BOTH:
        return None
    values = {field: getattr(args, dest) for dest, (field, _) in ALIGN_FLAGS.items() if field is not None}
    values = {k: v for k, v in values.items() if v is not None}
    for many in ("rewards", "reward_weights"):  # repeated or comma-separated
        if many in values:
            values[many] = tuple(values[many])
    return align_job.config_of(args.task, values)


def _rewards(text: str) -> str:
    """An argparse type: a reward spec (checked in full when the run starts, by align/rewards.py)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty reward spec")
    return text


def add_args(p: argparse.ArgumentParser) -> None:
    """The preference (--task dpo) and RL (--task grpo) flags, TRL's names; defaults None so that a flag given for
    the wrong task is seen, and TRL's defaults apply where none is given."""
    g = p.add_argument_group("preference and RL (--task dpo, --task grpo; TRL's names and defaults)")
    g.add_argument(
        "--beta",
        type=float,
        help="dpo: how far the policy may move from the reference, the implicit reward's scale (default 0.1); "
        "grpo: the KL coefficient (default 0.0: no reference pass at all; DeepSeek-R1 uses 0.001)",
    )
    g.add_argument(
        "--loss-type",
        choices=(*DPO_LOSSES, *GRPO_LOSSES),
        help="dpo: sigmoid (DPO, default), ipo, simpo (reference-free); grpo: how per-token losses aggregate: dapo "
        "(default: over the batch's tokens), grpo (per sequence, then mean), bnpo, dr_grpo (over batch x "
        "--max-completion-length); docs/preference.md has each formula",
    )
    g.add_argument(
        "--simpo-gamma", type=float, help="dpo: SimPO's target reward margin (--loss-type simpo; default 0.5)"
    )
    g.add_argument(
        "--ref-adapter",
        metavar="DIR",
        help="the reference is this adapter (an SFT run's), frozen (default: the base with the adapter disabled)",
    )
    g.add_argument(
        "--init-adapter",
        metavar="DIR",
        help="the trained adapter starts as this adapter (an SFT run's), its rank and targets included: LoRA flags "
        "are then refused",
    )
    _add_grpo_args(g)


def _add_grpo_args(g: argparse._ArgumentGroup) -> None:
    """The GRPO flags: sampling, clipping, advantages and rewards."""
    g.add_argument(
        "--num-generations",
        type=int,
        metavar="G",
        help="grpo: completions sampled per prompt (default 8); advantages are relative to the group",
    )
    g.add_argument(
        "--max-completion-length", type=int, metavar="N", help="grpo: the longest completion, in tokens (default 256)"
    )
    g.add_argument(
        "--temperature",
        type=float,
        help="grpo: temperature for sampling; the higher, the more random the completions (default 1.0)",
    )
    g.add_argument(
        "--top-p", type=float, help="grpo: sample from the smallest set of tokens of this total probability (1.0: all)"
    )
    g.add_argument("--top-k", type=int, help="grpo: sample from the k most likely tokens (default 0: all)")
    g.add_argument("--epsilon", type=float, help="grpo: the clipping range of the policy ratio (default 0.2)")
    g.add_argument(
        "--epsilon-high",
        type=float,
        help="grpo: the upper side of the clipping range (default: --epsilon; DAPO recommends 0.28)",
    )
    g.add_argument(
        "--scale-rewards",
        choices=SCALE_REWARDS,
        help="grpo: divide advantages by the group's reward std (group, default), the batch's (batch), or not "
        "(none, as Dr. GRPO recommends)",
    )
    g.add_argument(
        "--reward",
        action="append",
        type=_rewards,
        metavar="SPEC",
        help="grpo: a reward, repeatable (summed): exact_match (default; the row's answer), contains, "
        "regex:PATTERN (the whole stripped completion), json_valid, or pkg.module:function called as TRL calls "
        "reward functions (prompts=, completions=, completion_ids=, answer=) -> list[float | None]",
    )
    g.add_argument(
        "--reward-weights",
        type=float,
        nargs="+",
        metavar="W",
        help="grpo: one weight per --reward (default: all 1.0)",
    )


def print_report(report: dict[str, Any]) -> None:
    """The DPO/GRPO metrics of the validation set before and after training, one line each."""
    for when in ("before", "after"):
        values = report[when]
        listed = " ".join(f"valid_{k}={v:.4f}" for k, v in values.items())
        print(f"{when:<6} {listed}")
