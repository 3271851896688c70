"""Many adapters on a mixture-of-experts base: mixed-adapter batches over expert LoRA (each routed token with its
row's adapter), an AdapterTable's per-expert slots, named adapters, hot swap and delete on tiny transformers MoEs."""

import copy
import sys
from pathlib import Path

import pytest
import torch

import lorakit as lk

sys.path.insert(0, str(Path(__file__).parent))
import _moe_models  # noqa: E402

IDS = torch.randint(0, _moe_models.VOCAB, (4, 7), generator=torch.Generator().manual_seed(3))
ROWS = ["a", "b", None, "a"]


def _randomise(model, seed):
    """Every adapter's factors (active and waiting) drawn N(0, 0.3), seeded: B = 0 would hide a wrong slot."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            for name in layer.adapters.names():
                for t in layer.adapters.tensors(name).values():
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def _two_adapters(family):
    """The family's tiny MoE with adapter "a" (rank 4: every expert weight and q_proj) and "b" (rank 2, other
    alpha) on the same layers, both random."""
    base = _moe_models.BUILDERS[family]()
    model = lk.apply_lora(
        copy.deepcopy(base),
        lk.LoraConfig(rank=4, alpha=8),
        ["q_proj"],
        target_parameters=["all-experts"],
        adapter_name="a",
    )
    for layer in lk.lora_layers(model).values():
        layer.adapters.add("b", lk.LoraConfig(rank=2, alpha=6))
    _randomise(model, seed=1)
    return base, model.eval()


@pytest.fixture(scope="module", params=["qwen3_moe", "gpt_oss"])  # gpt-oss: transposed experts with biases
def moe(request):
    return _two_adapters(request.param)


@pytest.fixture(scope="module")
def qwen():
    return _two_adapters("qwen3_moe")


def _rows_alone(model, rows, ids=IDS):
    out = []
    with torch.no_grad():
        for i, name in enumerate(rows):
            if name is None:
                with lk.disable_adapters(model):
                    out.append(model(ids[i : i + 1]).logits)
            else:
                with lk.use_adapter(model, name):
                    out.append(model(ids[i : i + 1]).logits)
    return torch.cat(out)


def test_expert_layers_are_lora_layers_of_the_model(moe):
    _, model = moe
    experts = [n for n in lk.lora_layers(model) if "experts" in n]
    assert len(experts) == 4, list(lk.lora_layers(model))  # gate_up_proj and down_proj in 2 layers


def test_mixed_batch_of_expert_adapters_equals_each_row_alone(moe):
    base, model = moe
    want = _rows_alone(model, ROWS)
    with torch.no_grad(), lk.mixed_batch(model, ROWS):
        got = model(IDS).logits
    assert all(layer.mixed is None for layer in lk.lora_layers(model).values())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        bare = base(IDS[2:3]).logits
    torch.testing.assert_close(got[2:3], bare, rtol=1e-4, atol=1e-5)  # slot 0: the base
    assert (got[0] - got[1]).abs().max() > 1e-2  # the adapters do differ, so a wrong slot would show


def test_adapter_table_grows_per_expert_stacks_and_reuses_slots(qwen):
    _, model = qwen
    with lk.AdapterTable(model, capacity=1) as table:
        table.load("b")  # rank 2 first: loading "a" (rank 4) grows the rank and the slots
        table.load("a")
        stacks = lk.lora_layers(model)["model.layers.0.mlp.experts"].slot_stacks
        assert stacks is not None and stacks.rank == 4 and stacks.capacity >= 2
        assert stacks.A.dim() == 4 and stacks.A.shape[1] == 4  # (1 + capacity, experts, r, d_in)
        rows = ["b", "a", "a", None]
        with torch.no_grad(), table.batch(rows):
            got = model(IDS).logits
        torch.testing.assert_close(got, _rows_alone(model, rows), rtol=1e-4, atol=1e-5)
        table.unload("b")
        table.load("b")  # back into the freed slot
        with torch.no_grad(), table.batch(["a", "b", "b", "a"]):
            again = model(IDS).logits
        torch.testing.assert_close(again, _rows_alone(model, ["a", "b", "b", "a"]), rtol=1e-4, atol=1e-5)


def test_a_decode_step_of_one_token_per_row_mixes_adapters(qwen):
    """The server's decode step: one new token per row, each with its own adapter (T tokens = rows)."""
    _, model = qwen
    ids = IDS[:, :1]
    with torch.no_grad(), lk.mixed_batch(model, ["b", "a", None, "b"]):
        got = model(ids).logits
    torch.testing.assert_close(got, _rows_alone(model, ["b", "a", None, "b"], ids), rtol=1e-4, atol=1e-5)


def test_set_adapter_hot_swap_and_delete_on_experts(tmp_path):
    base, model = _two_adapters("qwen3_moe")
    single = {}
    for name in ("a", "b"):
        lk.set_adapter(model, name)
        with torch.no_grad():
            single[name] = model(IDS).logits
        lk.save_adapters(model, tmp_path / name, name=name)
    _randomise(model, seed=2)  # new weights for "a": what a hot swap brings in
    lk.set_adapter(model, "a")
    with torch.no_grad():
        single["a2"] = model(IDS).logits
    lk.save_adapters(model, tmp_path / "a2", name="a")
    assert not torch.allclose(single["a"], single["b"]) and not torch.allclose(single["a"], single["a2"])

    fresh = copy.deepcopy(base)  # each saved adapter alone on the base gives what set_adapter gave
    lk.load_adapters(fresh, tmp_path / "b", name="b")
    lk.load_adapters(fresh, tmp_path / "a", name="a")  # a second adapter beside it, waiting
    assert lk.list_adapters(fresh) == ["a", "b"]
    for name in ("b", "a"):
        lk.set_adapter(fresh, name)
        with torch.no_grad():
            torch.testing.assert_close(fresh(IDS).logits, single[name], rtol=1e-5, atol=1e-5)
    params = {id(p) for p in fresh.parameters()}
    lk.load_adapters(fresh, tmp_path / "a2", name="a")  # hot swap: new weights under the same name, in place
    assert {id(p) for p in fresh.parameters()} == params
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, single["a2"], rtol=1e-5, atol=1e-5)
    with pytest.raises(lk.LoraFileError):  # b's rank-2 factors under a's rank-4 name: refused, nothing changed
        lk.load_adapters(fresh, tmp_path / "b", name="a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, single["a2"], rtol=0, atol=0)
    lk.delete_adapter(fresh, "a")
    lk.delete_adapter(fresh, "b")
    assert not lk.lora_layers(fresh)
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, base(IDS).logits)
