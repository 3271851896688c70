"""The engine runs rows of different adapter compositions in one forward, each equal to the composition alone.

Rows are submitted before the engine starts, so its first admission takes them all: one prefill and then decode
steps whose one forward holds every row (a forward pre-hook on the model sees the batch). Each row's greedy tokens
must equal the same composition built by `lk.combine_adapters(method="cat")` and generated alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.errors import LoraAdapterNotFound
from lorakit.serve import Engine
from lorakit.serve.compose import NotComposable, check, label

sys.path.insert(0, str(Path(__file__).parent))
from _engine import ENGINES, alone, greedy, prompts, started, stop_all  # noqa: E402

LLAMA_ROWS = [  # the bare base, one adapter (today's key), compositions of 1 to 3 adapters, a weight-0 row (the base)
    None,
    "a1",
    {"a1": 0.5, "a2": -1.0},
    {"a3": 2.0},
    [("a4", 0.3), ("a5", 0.7), ("a6", -0.2)],
    {"a1": 0.0},
    {"a8": -0.5, "a7": 1.0},
]
GPT2_ROWS = [{"g1": 0.6, "g2": -0.4}, None, {"g3": 1.5, "g1": 1.0}, "g2"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops run faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    stop_all()


def run_together(model, tok, rows, max_tokens: int):
    """Submit one prompt per row before the engine starts; the tokens of each, and the batch size of every forward."""
    seen: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(tuple(ids.shape))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        engine = Engine(model, tok, max_batch=len(rows))
        ENGINES.append(engine)  # stopped by `stop_all` if the test fails
        asked = prompts(tok, len(rows))
        handles = [engine.submit(p, row, greedy(tok, max_tokens)) for p, row in zip(asked, rows, strict=True)]
        in_flight = {name: engine.in_flight(name) for name in (None, "a1", "a2", "g1")}
        engine.start()
        results = [[s.token_id for s in h if s.token_id is not None] for h in handles]
        engine.stop(5)
    finally:
        hook.remove()
    return asked, results, seen, in_flight


def composed_alone(model, tok, prompt, row, max_tokens: int) -> list[int]:
    """The row's composition as one adapter (`combine_adapters`, "cat": exact), generated alone; then deleted."""
    key = lk.row_key(row)
    if key is None or isinstance(key, str):
        return alone(model, tok, prompt, key, max_tokens)
    lk.combine_adapters(model, dict(key), "composed", method="cat")
    try:
        return alone(model, tok, prompt, "composed", max_tokens)
    finally:
        lk.delete_adapter(model, "composed")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_rows_of_different_compositions_share_each_forward_and_equal_the_composition_alone(request, kind):
    model, tok = request.getfixturevalue(kind)
    rows = LLAMA_ROWS if kind == "llama" else GPT2_ROWS
    asked, results, seen, in_flight = run_together(model, tok, rows, max_tokens=10)
    assert (len(rows), 1) in seen, seen  # a decode step: one forward, every row, whatever its composition
    assert max(b for b, _ in seen) == len(rows)
    for prompt, row, got in zip(asked, rows, results, strict=True):
        assert got == composed_alone(model, tok, prompt, row, 10), row
    if kind == "llama":  # waiting rows counted by every adapter they compose; a weight-0 row is the base's
        assert in_flight == {None: 2, "a1": 2, "a2": 1, "g1": 0}


def test_submit_checks_every_adapter_of_a_composition(llama):
    model, tok = llama
    engine = started(model, tok)
    with pytest.raises(LoraAdapterNotFound, match="'nope'"):
        engine.submit([1, 2], {"a1": 0.5, "nope": 1.0}, greedy(tok, 2))
    with pytest.raises(ValueError, match="'a1' appears twice"):
        engine.submit([1, 2], [("a1", 0.5), ("a1", 1.0)], greedy(tok, 2))
    with pytest.raises(ValueError, match="finite"):
        engine.submit([1, 2], {"a1": float("nan")}, greedy(tok, 2))
    assert engine.queued == 0


def test_a_dora_adapter_runs_only_alone_at_weight_one():
    loaded, solo = frozenset({"a", "d"}), frozenset({"d"})
    check("d", loaded, solo)  # alone at weight 1: its own forward, as before
    check((("a", 0.5),), loaded, solo)
    for key in ((("d", 0.5),), (("a", 1.0), ("d", 1.0))):
        with pytest.raises(NotComposable, match="'d' uses DoRA"):
            check(key, loaded, solo)
    assert (label(None), label("a"), label((("d", 0.5), ("a", -1.0)))) == ("base", "a", "a+d")
