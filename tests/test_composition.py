"""Per-row adapter compositions in one mixed batch (lorakit.composition): a row may run the base, one adapter, or
a weighted sum of adapters, and each row equals `combine_adapters(weights, method="cat")` run alone with that
adapter active; weight 0 is the base bit for bit; today's rows keep today's index and bits."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit as lk

sys.path.insert(0, str(Path(__file__).parent))
import _moe_models  # noqa: E402
import _tiny_models  # noqa: E402

# K varies across one batch: the base, one adapter, two with a negative weight, all zero (= base), three
ROWS = [None, "a", {"a": 0.7, "b": -0.3}, {"a": 0.0}, [("a", 0.5), ("b", 0.25), ("c", -1.0)]]
COMBINED = {2: ("ab", {"a": 0.7, "b": -0.3}), 4: ("abc", {"a": 0.5, "b": 0.25, "c": -1.0})}
BASE_ROWS = (0, 3)


def _add_adapters(model: nn.Module, seed: int) -> nn.Module:
    """Adapters "b" (rank 3) and "c" (rank 1) beside "a" on every LoRA layer, all factors random: ranks differ."""
    for layer in lk.lora_layers(model).values():
        layer.adapters.add("b", lk.LoraConfig(rank=3, alpha=6.0))
        layer.adapters.add("c", lk.LoraConfig(rank=1, alpha=0.5))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            for name in layer.adapters.names():
                for t in layer.adapters.tensors(name).values():
                    t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * 0.3)
    for name, weights in COMBINED.values():  # the oracle: the same compositions built as adapters
        lk.combine_adapters(model, weights, name, method="cat")
    return model.eval()


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _rows_alone(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Each row of `ids` run alone: the base, its adapter, or its composition's combined adapter."""
    out = []
    with torch.no_grad():
        for i, row in enumerate(ROWS):
            name = COMBINED[i][0] if i in COMBINED else (row if isinstance(row, str) else None)
            if name is None:
                with lk.disable_adapters(model):
                    out.append(_logits(model(ids[i : i + 1])))
            else:
                with lk.use_adapter(model, name):
                    out.append(_logits(model(ids[i : i + 1])))
    return torch.cat(out)


def _check_rows(model: nn.Module, ids: torch.Tensor, tol: float, experts: bool = False) -> None:
    """The mixed batch of ROWS equals each row alone; its base rows equal the base on the same batch bit for bit.

    With `experts`, a row's routed GEMMs are shared with the batch's other rows (their count and position decide
    the kernel's blocking), so no row of that path is bit-reproducible across batches, today's None rows neither:
    the base rows are then compared to a batch of None rows to float32 rounding.
    """
    with torch.no_grad(), lk.mixed_batch(model, ROWS):
        got = _logits(model(ids))
    torch.testing.assert_close(got, _rows_alone(model, ids), rtol=tol, atol=tol)
    if experts:
        with torch.no_grad(), lk.mixed_batch(model, [None] * len(ROWS)):
            base = _logits(model(ids))
        torch.testing.assert_close(got[list(BASE_ROWS)], base[list(BASE_ROWS)], rtol=tol, atol=tol)
    else:
        with torch.no_grad(), lk.disable_adapters(model):
            base = _logits(model(ids))
        for i in BASE_ROWS:
            assert torch.equal(got[i], base[i]), f"row {i} ({ROWS[i]!r}) is not the base bit for bit"
    assert (got[2] - got[1]).abs().max() > 1e-3 and (got[4] - got[2]).abs().max() > 1e-3  # compositions differ


class _EmbConvLinear(nn.Module):
    """An embedding, a Conv1d over the sequence and a Linear head: the module layer kinds in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.conv, self.head = nn.Embedding(11, 6), nn.Conv1d(6, 6, 3, padding=1), nn.Linear(6, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)  # (batch, T, 6)
        return self.head(h)


@pytest.mark.parametrize("target", [["emb"], ["conv"], ["head"], ["emb", "conv", "head"]])
def test_every_module_layer_kind_runs_a_row_composition_as_combine_cat(target):
    torch.manual_seed(0)
    model = lk.apply_lora(_EmbConvLinear().double(), lk.LoraConfig(rank=2, alpha=4.0), target, adapter_name="a")
    _add_adapters(model, seed=1)
    ids = torch.randint(0, 11, (len(ROWS), 7), generator=torch.Generator().manual_seed(2))
    _check_rows(model, ids, tol=1e-10)


@pytest.fixture(scope="module", params=["llama", "gpt2"])  # gpt2: transformers' Conv1D (fan_in_fan_out)
def hf_model(request):
    if request.param == "llama":
        base, targets = _tiny_models.llama().double(), ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    else:
        base, targets = _tiny_models.gpt2().double(), ["c_attn", "c_fc", "wte"]
    model = lk.apply_lora(base, lk.LoraConfig(rank=4, alpha=8.0), targets, adapter_name="a")
    return _add_adapters(model, seed=3)


def test_real_transformers_mixed_batch_with_compositions_equals_combined_adapters_one_by_one(hf_model):
    ids = torch.randint(0, 100, (len(ROWS), 6), generator=torch.Generator().manual_seed(4))
    _check_rows(hf_model, ids, tol=1e-10)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # gpt-oss: transposed experts with biases
def test_expert_weights_run_row_compositions_as_combine_cat(family):
    base = _moe_models.BUILDERS[family]()
    model = lk.apply_lora(
        copy.deepcopy(base),
        lk.LoraConfig(rank=4, alpha=8),
        ["q_proj"],
        target_parameters=["all-experts"],
        adapter_name="a",
    )
    _add_adapters(model, seed=6)
    assert any("experts" in n for n in lk.lora_layers(model))
    ids = torch.randint(0, _moe_models.VOCAB, (len(ROWS), 7), generator=torch.Generator().manual_seed(7))
    _check_rows(model, ids, tol=1e-5, experts=True)  # fp32 MoE
    decode = ids[:, :1]  # one token per row: the gathered path of the expert delta
    _check_rows(model, decode, tol=1e-5, experts=True)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    return _add_adapters(lk.apply_lora(base, lk.LoraConfig(rank=2, alpha=4.0), ["0", "2"], adapter_name="a"), 8)


def test_todays_rows_keep_the_rows_index_and_bits_and_weight_one_is_the_name():
    model = _mlp()
    x = torch.randn(3, 8, dtype=torch.float64)
    with lk.AdapterTable(model) as table:
        for n in ("a", "b"):
            table.load(n)
        slots, weights = table.index_of(["a", None, "b"])
        assert slots.shape == (3,) and weights is None  # today's (rows,) index: no weights tensor
        assert table.index_of([{"a": 1.0}, {"b": 0.0}, [("b", 1.0)]])[0] is slots  # spelled as compositions
        with torch.no_grad(), table.batch(["a", None, "b"]):
            today = model(x)
        with torch.no_grad(), table.batch([{"a": 1.0}, {}, (("b", 1.0),)]):
            spelled = model(x)
        assert torch.equal(today, spelled)
        slots, weights = table.index_of([{"a": 0.5}, None, {"a": 1.0, "b": 2.0}])
        assert slots.tolist() == [[1, 0], [0, 0], [1, 2]] and weights.tolist() == [[0.5, 0], [0, 0], [1.0, 2.0]]


def test_the_gathered_state_follows_the_weights_batch_after_batch():
    """A table runs batches one after another: the gathered state of each layer is made for its weights."""
    model = _mlp()
    lk.combine_adapters(model, {"a": -0.5}, "neg")
    lk.combine_adapters(model, {"a": 0.5}, "pos")
    x = torch.randn(2, 8, dtype=torch.float64)
    with lk.AdapterTable(model) as table:
        table.load("a")
        for w, name in [(0.5, "pos"), (-0.5, "neg"), (0.5, "pos")]:
            with torch.no_grad(), table.batch([{"a": w}, {"a": w}]):
                got = model(x)
            with torch.no_grad(), lk.use_adapter(model, name):
                torch.testing.assert_close(got, model(x), rtol=1e-10, atol=1e-10)


def test_composition_normalises_and_keys_rows():
    assert lk.composition(None) == () and lk.composition("a") == (("a", 1.0),)
    assert lk.composition({"a": 0.7, "b": -0.3, "c": 0}) == (("a", 0.7), ("b", -0.3))
    assert lk.composition([("a", 2)]) == (("a", 2.0),)
    assert lk.row_key({"a": 0.0}) is None and lk.row_key([]) is None and lk.row_key(None) is None
    assert lk.row_key([("a", 1.0)]) == "a" and lk.row_key("a") == "a"
    assert lk.row_key({"a": 0.5, "b": 1.0}) == (("a", 0.5), ("b", 1.0))
    hash(lk.row_key({"a": 0.5}))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"a": float("nan")}, r"'a'.*nan.*finite"),
        ({"a": float("inf")}, r"'a'.*inf.*finite"),
        ([("a", 1.0), ("a", 0.5)], r"'a' appears twice"),
        ({"": 1.0}, "empty"),
        ({"a": "x"}, r"'a'.*'x'.*real number"),
        ([("a", 1.0, 2)], r"not a \(name, weight\) pair"),
        ({3: 1.0}, "adapter name 3"),
    ],
)
def test_a_bad_composition_is_refused_naming_the_entry(spec, match):
    model = _mlp()
    with pytest.raises(ValueError, match=match):
        lk.composition(spec)
    with pytest.raises(ValueError, match=match), lk.mixed_batch(model, [None, spec]):
        pass


def test_an_unknown_name_in_a_composition_is_not_found_naming_it():
    model = _mlp()
    with pytest.raises(lk.LoraAdapterNotFound, match="'nope'"), lk.mixed_batch(model, ["a", {"a": 0.5, "nope": 1}]):
        pass
    with lk.AdapterTable(model) as table:
        table.load("a")
        with pytest.raises(lk.LoraAdapterNotFound, match="'b'"), table.batch([{"a": 0.5, "b": 0.5}]):
            pass


def test_a_dora_adapter_in_a_composition_is_refused_naming_it():
    model = lk.apply_lora(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(rank=2, use_dora=True), ["0"], adapter_name="d")
    with pytest.raises(ValueError, match=r"'d'.*DoRA"), lk.mixed_batch(model, [{"d": 0.5}, None]):
        pass
