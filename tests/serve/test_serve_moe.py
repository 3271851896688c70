"""`lorakit serve` on a mixture-of-experts model: two adapters with LoRA on the fused expert weights, asked for at
once through the real `openai` client, answer with the tokens each adapter gives alone in this process.

Concurrent requests for different adapters decode in one mixed batch: every routed (token, expert) pair runs its
row's adapter's expert factors. One real server subprocess (a tiny random Qwen3-MoE) for the module.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _hf_models  # noqa: E402
import _serving  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

openai = pytest.importorskip("openai")

PROMPTS = ["the cat sat", "hello world", "one two three", "the quick brown fox"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_moe")
    model = _hf_models.save_tiny("qwen3_moe", root / "moe")
    adapters = {  # "a": the experts only; "b": the experts and attention, another seed
        "a": _serving.make_adapter(model, root / "a", 1, targets=(), target_parameters=("all-experts",)),
        "b": _serving.make_adapter(model, root / "b", 2, target_parameters=("all-experts",)),
    }
    server = _serving.Server("--model", model, "--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}")
    yield {"server": server, "client": server.client(), "ref": _serving.Reference(model, adapters)}
    assert server.stop() == 0, "".join(server.stderr)


def test_concurrent_requests_for_expert_adapters_get_each_adapters_tokens(setup):
    ref, client = setup["ref"], setup["client"]
    jobs = [(m, p) for p in PROMPTS for m in ("a", "base", "b")]  # interleaved: each decode step mixes adapters

    def ask(job):
        m, p = job
        return client.completions.create(model=m, prompt=p, max_tokens=8, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    want = [ref.greedy(None if m == "base" else m, ref.ids(p), 8, ref.eos)[0] for m, p in jobs]
    assert got == want
    by_model = {m: [t for (mm, _), t in zip(jobs, got, strict=True) if mm == m] for m in ("a", "base", "b")}
    assert len({tuple(texts) for texts in by_model.values()}) == 3, by_model  # the expert adapters change the text
