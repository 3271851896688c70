"""The continuous-batching engine on real tiny transformers models with real adapters.

Every greedy request must equal the same prompt run alone through `lk.use_adapter` (or
`lk.disable_adapters`) and `model.generate`, token for token, whatever else shares its batch.
Requests that race the engine synchronise on events (its `on_step` hook, a handle's first step).
"""

from __future__ import annotations

import copy
import sys
import threading
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.serve import Engine, EngineClosed, QueueFull, SamplingParams
from lorakit.serve.detok import TextStream

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


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops run faster on one thread, and two threads of this test do not fight over cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def served(kind: str, adapters: dict, root: Path):
    """A tiny random `kind` model with `adapters` (random non-zero A and B) saved and loaded by name, and its tokenizer."""
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


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return served("llama", LLAMA_ADAPTERS, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return served("gpt2", GPT2_ADAPTERS, tmp_path_factory.mktemp("serve"))


def alone(model, tok, prompt: list[int], adapter: str | None, max_tokens: int) -> list[int]:
    """The greedy completion of `prompt` run by itself through generate (stopping at EOS, as the engine is told to)."""
    ctx = lk.disable_adapters(model) if adapter is None else lk.use_adapter(model, adapter)
    with torch.no_grad(), ctx:
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return out[0, len(prompt):].tolist()


def prompts(tok, n: int) -> list[list[int]]:
    """n prompts of different lengths (2 to ~30 tokens) from the tiny tokenizer's sentences."""
    s = _hf_models.SENTENCES
    texts = [" ".join(s[(i + k) % len(s)] for k in range(1 + i % 3)) for i in range(n)]
    return [tok(t)["input_ids"][: 2 + (i * 7) % 29] for i, t in enumerate(texts)]


def greedy(tok, max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, stop_token_ids=(tok.eos_token_id,), **kw)


def check(tok, prompt, ref, steps):
    """A request's steps against its reference: tokens, counts, finish reason and text."""
    tokens = [s.token_id for s in steps if s.token_id is not None]
    assert tokens == ref
    last = steps[-1]
    assert [s.finish_reason for s in steps[:-1]] == [None] * (len(steps) - 1)
    assert last.finish_reason == ("stop" if ref and ref[-1] == tok.eos_token_id else "length")
    assert (last.prompt_tokens, last.completion_tokens) == (len(prompt), len(ref))
    text = tok.decode(prompt + ref, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):]
    assert "".join(s.text for s in steps) == text


def run_waves(model, tok, requests, waves: list[list[list[int]]], max_batch: int):
    """Submit `requests` (prompt, adapter, max_tokens) in waves, each from several threads: wave w+1 is submitted
    once a request of wave w has its first token, and the engine waits at step w+1 until wave w+1 is in, so
    every wave joins while the earlier ones decode. Returns {index: steps} and the (batch size, queue) per step."""
    submitted = [[threading.Event() for _ in wave] for wave in waves]
    first = [threading.Event() for _ in waves]
    seen: list[tuple[int, int]] = []
    waited: list[bool] = []

    def on_step(batch: int, queued: int) -> None:
        seen.append((batch, queued))
        if len(seen) < len(waves):
            waited.append(all(e.wait(60) for e in submitted[len(seen)]))

    engine = Engine(model, tok, max_batch=max_batch, on_step=on_step)
    engine.start()
    results: dict[int, list] = {}

    def client(w: int, t: int, indices: list[int]) -> None:
        if w:
            first[w - 1].wait(60)
        handles = [(i, engine.submit(requests[i][0], requests[i][1], greedy(tok, requests[i][2]))) for i in indices]
        submitted[w][t].set()
        for i, h in handles:
            results[i] = []
            for step in h:
                results[i].append(step)
                first[w].set()

    threads = [threading.Thread(target=client, args=(w, t, idx)) for w, wave in enumerate(waves)
               for t, idx in enumerate(wave)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    engine.stop(10)
    assert waited and all(waited), "a wave was not submitted in time"
    return results, seen


def test_48_concurrent_requests_over_8_adapters_and_the_base_equal_each_run_alone(llama):
    model, tok = llama
    names = [None, *LLAMA_ADAPTERS]
    ps = prompts(tok, 48)
    requests = [(ps[i], names[i % len(names)], 3 + (i * 5) % 22) for i in range(48)]
    refs = [alone(model, tok, *r) for r in requests]
    assert len({tuple(alone(model, tok, ps[0], n, 8)) for n in names}) >= 6, "the adapters must change the output"
    waves = [[list(range(w * 16 + t, w * 16 + 16, 4)) for t in range(4)] for w in range(3)]  # 3 waves x 4 threads
    results, seen = run_waves(model, tok, requests, waves, max_batch=32)
    for i, (prompt, _, _) in enumerate(requests):
        check(tok, prompt, refs[i], results[i])
    assert max(b for b, _ in seen) == 32 and any(q for _, q in seen)  # a full batch, and the third wave waited


def test_gpt2_requests_over_adapters_equal_each_run_alone(gpt2):
    model, tok = gpt2
    names = [None, *GPT2_ADAPTERS]
    ps = prompts(tok, 12)
    requests = [(ps[i], names[i % len(names)], 2 + (i * 3) % 11) for i in range(12)]
    refs = [alone(model, tok, *r) for r in requests]
    results, _ = run_waves(model, tok, requests, [[[0, 2, 4], [1, 3, 5]], [[6, 8, 10], [7, 9, 11]]], max_batch=8)
    for i, (prompt, _, _) in enumerate(requests):
        check(tok, prompt, refs[i], results[i])
