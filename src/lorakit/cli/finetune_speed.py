"""`lorakit finetune`'s speed flags (the job's `speed` settings, hf/speed.py): the loss, fused blocks, compile."""

from __future__ import annotations

import argparse

from ..hf.speed import LOSSES, SWITCHES, SpeedConfig


def add_args(p: argparse.ArgumentParser) -> None:
    """The "speed" group: --loss, --fuse, --compile (each "auto" by default: what was measured to pay)."""
    g = p.add_argument_group("speed (docs/finetuning.md#speed)")
    g.add_argument(
        "--loss",
        choices=LOSSES,
        default="auto",
        help="causal-lm loss: chunked cross-entropy that never holds the full (tokens, vocab) logits and sends only "
        "trained positions to the lm_head, or the model's plain loss; auto: chunked where the model's head allows it "
        "(a plain lm_head, no soft-capping) and the vocabulary is large enough to pay (default auto)",
    )
    g.add_argument(
        "--fuse",
        choices=SWITCHES,
        default="auto",
        help="fused RMSNorm, SwiGLU and RoPE (Llama/Mistral/Qwen2/Qwen3 families) in eager training: fewer passes "
        "and saved tensors, same results; auto = on when training on the CPU (default auto)",
    )
    g.add_argument(
        "--compile",
        choices=SWITCHES,
        default="auto",
        help="torch.compile each decoder block once, reused by every layer (default auto: on for CPU runs whose "
        "--max-steps reaches the measured break-even, see docs/finetuning.md)",
    )
    add_offload(g)


def add_offload(g: argparse._ArgumentGroup) -> None:
    """--offload-activations: the TrainConfig's offload_activations (CUDA only)."""
    g.add_argument(
        "--offload-activations",
        action="store_true",
        help="CUDA: keep the activations saved for backward in pinned CPU memory (less GPU memory for long "
        "sequences, some host<->GPU copying); an error on CPU, where they already are",
    )


def config(args: argparse.Namespace) -> SpeedConfig:
    """The job's SpeedConfig from the flags."""
    return SpeedConfig(loss=args.loss, fuse=args.fuse, compile=args.compile)
