"""benchmarks/e2e.py's sides and variants: which commands run, and each variant's settings."""

from __future__ import annotations

import argparse

# key -> (kind, extra): lorakit sides add `extra` to `lorakit finetune`'s flags; Trainer sides: ["compile"] for
# TrainingArguments(torch_compile=True)
SIDES: dict[str, tuple[str, list[str]]] = {
    "lk": ("lk", []),
    "lk-compile": ("lk", ["--compile", "on"]),
    "lk-offload": ("lk", ["--offload-activations"]),
    "hf": ("hf", []),
    "hf-compile": ("hf", ["compile"]),
}
NAMES = {
    "lk": "lorakit finetune",
    "lk-compile": "lorakit finetune --compile on",
    "lk-offload": "lorakit finetune --offload-activations",
    "hf": "Trainer + PEFT",
    "hf-compile": "Trainer + PEFT (torch_compile=True)",
}

# each variant's settings over the command line's (a setting given on the command line wins); long: rows of
# about 1024 tokens at batch 1 (about as many tokens a step as base's 4 x ~256), 20 steps to keep the page's
# total within ~20 minutes on one core
VARIANTS: dict[str, dict[str, int]] = {
    "base": {},
    "vocab32k": {"vocab": 32000},
    "long": {"max_length": 1024, "batch": 1, "steps": 20, "rows": 200},
}
QUICK = {"hidden": 32, "intermediate": 64, "layers": 2, "heads": 2, "vocab": 128, "batch": 2, "max_length": 32}
QUICK_RUN = {"rows": 40, "steps": 6, "log_every": 2, "reps": 1}
QUICK_VARIANTS: dict[str, dict[str, int]] = {"base": {}, "vocab32k": {"vocab": 1024}, "long": {"max_length": 96}}


def variant(a: argparse.Namespace, name: str) -> argparse.Namespace:
    """A copy of the command line's settings `a` with variant `name`'s (at --quick: tiny sizes, few steps)."""
    v = argparse.Namespace(**vars(a))
    v.name = name
    if a.quick:
        vars(v).update({**QUICK, **QUICK_RUN, **QUICK_VARIANTS[name]})
        if name == "long":
            v.batch = 1
        return v
    vars(v).update({k: x for k, x in VARIANTS[name].items() if k not in a.given})
    return v
