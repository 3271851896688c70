"""Helpers of the engine tests: tiny transformers models with named adapters, and their reference generations.

Import after `sys.path.insert(0, <this directory>)`; the models themselves are the `llama` and `gpt2` fixtures of
conftest.py, built once for every engine test module.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

import lorakit as lk
from lorakit.serve import Engine, SamplingParams

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

LLAMA_ADAPTERS = {  # name -> (rank, targets): ranks and target sets differ, so the mixed batch pads and skips
    "a1": (1, ["q_proj", "v_proj"]),
    "a2": (2, ["k_proj", "o_proj"]),
    "a3": (3, ["gate_proj", "up_proj", "down_proj"]),
    "a4": (4, "all-linear"),
    "a5": (8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "a6": (2, ["down_proj"]),
    "a7": (4, ["up_proj", "v_proj"]),
    "a8": (6, ["o_proj", "gate_proj"]),
}
GPT2_ADAPTERS = {"g1": (2, ["c_attn"]), "g2": (4, ["c_fc", "mlp.c_proj"]), "g3": (3, "all-linear")}


def served(kind: str, adapters: dict, root: Path):
    """A tiny random `kind` model with `adapters` (random non-zero A, B) saved and loaded by name; its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = _hf_models.save_tiny(kind, root / kind)
    base = AutoModelForCausalLM.from_pretrained(directory).eval()
    model = copy.deepcopy(base)
    for seed, (name, (rank, targets)) in enumerate(adapters.items()):
        trained = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=rank, alpha=2 * rank), targets)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in trained.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        lk.save_adapters(trained, root / f"{kind}-{name}")
        lk.load_adapters(model, root / f"{kind}-{name}", name=name)
    return model.eval(), AutoTokenizer.from_pretrained(directory)


def alone(model, tok, prompt: list[int], adapter: str | None, max_tokens: int) -> list[int]:
    """The greedy completion of `prompt` run by itself through generate (stopping at EOS, as the engine is told to)."""
    ctx = lk.disable_adapters(model) if adapter is None else lk.use_adapter(model, adapter)
    with torch.no_grad(), ctx:
        out = model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=max_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return out[0, len(prompt) :].tolist()


def prompts(tok, n: int) -> list[list[int]]:
    """n prompts of different lengths (2 to ~30 tokens) from the tiny tokenizer's sentences."""
    s = _hf_models.SENTENCES
    texts = [" ".join(s[(i + k) % len(s)] for k in range(1 + i % 3)) for i in range(n)]
    return [tok(t)["input_ids"][: 2 + (i * 7) % 29] for i, t in enumerate(texts)]


def greedy(tok, max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, stop_token_ids=(tok.eos_token_id,), **kw)


ENGINES: list[Engine] = []  # the engines a test started, stopped after it by its module's `stop_engines` fixture


def started(model, tok, **kw) -> Engine:
    engine = Engine(model, tok, **kw)
    ENGINES.append(engine)
    engine.start()
    return engine


def stop_all() -> None:
    """Stop every engine `started` left running (a failed test's), so none runs on the shared model into the next."""
    while ENGINES:
        ENGINES.pop().stop(0)
