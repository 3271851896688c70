"""The preallocated KV cache (`generation.kv.Batch` over slab.py): each row's logits equal the row run alone
through transformers' own `DynamicCache`, across rows leaving and joining, the slab growing and its window moving
back to column 0; a decode step writes in place (the slab's storage stays the same, no cache grown by `cat`)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit.generation.kv import Batch

VOCAB = 50


def tiny(kind: str):
    import transformers

    torch.manual_seed(0)
    if kind == "llama":  # grouped-query attention: 4 heads over 2 key/value heads
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops run faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return tiny(request.param)


def alone(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's logits (V,) of `prompt` run by itself through transformers' DynamicCache."""
    from transformers import DynamicCache

    cache, ids, tokens, logits = DynamicCache(), torch.tensor([prompt]), [], []
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=ids, cache=cache, use_cache=True)
            logits.append(out.logits[0, -1])
            tokens.append(int(logits[-1].argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens, logits


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Rows:
    """A slab batch driven greedily, each row checked at every step against its reference run alone."""

    def __init__(self, model, prompts: dict[str, list[int]], first: list[str], steps: int = 40) -> None:
        self.model, self.at = model, {}
        self.refs = {name: alone(model, p, steps) for name, p in prompts.items()}
        self.events: list[str] = []  # how the window changed: "grew", "compacted"
        self.checked = 0
        self.batch = self.prefill({k: prompts[k] for k in first})

    def prefill(self, prompts: dict[str, list[int]]) -> Batch:
        with torch.no_grad():
            logits, batch = Batch.prefill(self.model, list(prompts.values()), 0)
        self.check(list(prompts), logits)
        batch.last = logits.argmax(-1)
        return batch

    def check(self, names: list[str], logits: torch.Tensor) -> None:
        for name, row in zip(names, logits, strict=True):
            n = self.at.get(name, 0)
            torch.testing.assert_close(row, self.refs[name][1][n], rtol=1e-5, atol=1e-5)
            self.at[name] = n + 1
            self.checked += 1

    def step(self, names: list[str], n: int = 1) -> None:
        for _ in range(n):
            w = self.batch.window
            before = (w.column_capacity, w.start)
            with torch.no_grad():
                logits = self.batch.step(self.model)
            if w.column_capacity > before[0]:
                self.events.append("grew")
            elif w.start < before[1]:
                self.events.append("compacted")
            self.check(names, logits)
            self.batch.last = logits.argmax(-1)


def test_rows_equal_each_run_alone_across_leaves_joins_growth_and_compaction(model):
    prompts = {"long": prompt(1, 23), "short": prompt(2, 3), "mid": prompt(3, 9), "x": prompt(4, 30), "y": prompt(5, 2)}
    r = Rows(model, prompts, ["long", "short", "mid"])
    assert r.batch.window.column_capacity == 23  # the prefill sizes the slab for its prompts
    names = ["long", "short", "mid"]
    r.step(names, 3)  # the first step finds the slab full: it doubles
    order = r.batch.keep([1, 2])  # the longest row leaves: the columns that were only its padding leave too
    names = [names[i] for i in order]
    assert r.batch.window.start > 0
    r.step(names, 2)
    with torch.no_grad():
        logits, joining = Batch.prefill(model, [prompts["x"], prompts["y"]], 0)
    r.check(["x", "y"], logits)
    joining.last = logits.argmax(-1)
    r.batch = r.batch.merge(joining)  # x is wider than the window: it widens to the left
    names += ["x", "y"]
    r.step(names, 4)
    order = r.batch.keep([1, 2, 3])  # "mid" leaves: the last row moves into its hole
    names = [names[i] for i in order]
    assert names == ["y", "short", "x"]
    r.step(names, 5)
    order = r.batch.keep([0, 1])  # x leaves: the window narrows to the right
    names = [names[i] for i in order]
    r.step(names, 30 - r.at["short"])
    assert "grew" in r.events and r.checked > 70


def test_the_window_moves_back_to_column_0_in_place(model):
    prompts = {"long": prompt(13, 20), "late": prompt(14, 2)}
    r = Rows(model, prompts, ["long"])
    r.step(["long"], 16)  # the slab doubled to 40 columns at the first step
    with torch.no_grad():
        logits, joining = Batch.prefill(model, [prompts["late"]], 0)
    r.check(["late"], logits)
    joining.last = logits.argmax(-1)
    r.batch = r.batch.merge(joining)
    r.step(["long", "late"], 1)
    assert r.batch.keep([1]) == [1]  # the long row leaves: the window is the late row's few columns, at the end
    storage = [k.data_ptr() for k, _ in r.batch.cache.slabs()]
    r.step(["late"], 8)
    assert r.events == ["grew", "compacted"] and r.batch.window.start == 0
    assert [k.data_ptr() for k, _ in r.batch.cache.slabs()] == storage


def test_select_copies_rows_with_repeats(model):
    p = [prompt(6, 5), prompt(7, 8)]
    refs = [alone(model, x, 4) for x in p]
    with torch.no_grad():
        logits, batch = Batch.prefill(model, p, 0)
        batch = batch.select([1, 0, 1])
        batch.last = logits.argmax(-1)[[1, 0, 1]]
        for s in range(1, 4):
            logits = batch.step(model)
            for row, i in zip(logits, [1, 0, 1], strict=True):
                torch.testing.assert_close(row, refs[i][1][s], rtol=1e-5, atol=1e-5)
            batch.last = logits.argmax(-1)


def test_chunked_prefill_equals_one_forward(model):
    from lorakit.generation.kv import Prefill

    p = [prompt(8, 17), prompt(9, 4), prompt(10, 11)]
    with torch.no_grad():
        whole, _ = Batch.prefill(model, p, 0)
        job = Prefill(model, p, 0)
        outs = [job.run(model, 5) for _ in range(4)]
    assert [o is None for o in outs] == [True, True, True, False] and job.remaining == 0
    torch.testing.assert_close(outs[-1], whole, rtol=1e-5, atol=1e-5)


class Cats(TorchDispatchMode):
    """Counts the concatenations that produce more than one position (a cache grown by `cat`; RoPE's is one)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.cat.default and out.dim() == 4 and out.shape[-2] > 1:
            self.n += 1
        return out


def test_a_decode_step_writes_the_cache_in_place(model):
    with torch.no_grad():
        logits, batch = Batch.prefill(model, [prompt(11, 6), prompt(12, 3)], 0)
        batch.last = logits.argmax(-1)
        batch.last = batch.step(model).argmax(-1)  # the prefill's slab is full: the first step doubles it, once
        storage = [(k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr()) for k, v in batch.kv]
        for _ in range(5):
            with Cats() as cats:
                batch.last = batch.step(model).argmax(-1)
            assert cats.n == 0
            assert [(k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr()) for k, v in batch.kv] == storage
    assert batch.mask.shape == (2, 12)
