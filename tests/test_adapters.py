"""Many named adapters on one base: switch, disable, delete, hot swap, mixed batches, combine."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit as lk

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_models import llama  # noqa: E402

IDS = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(5))

SPECS = {  # name -> (config, targets): different ranks, alphas and target subsets
    "math": (lk.LoraConfig(rank=4, alpha=8), ["q_proj", "v_proj"]),
    "code": (lk.LoraConfig(rank=2, alpha=16, use_rslora=True), ["o_proj", "down_proj", "embed_tokens"]),
    "chat": (lk.LoraConfig(rank=8, alpha=4), "all-linear"),
}


def random_adapter(base, name, directory, seed):
    cfg, targets = SPECS[name]
    model = lk.apply_lora(copy.deepcopy(base), cfg, targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lk.save_adapters(model, directory / name)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    base = llama()
    singles = {n: random_adapter(base, n, d, seed) for seed, n in enumerate(SPECS)}
    model = copy.deepcopy(base)
    for n in SPECS:
        lk.load_adapters(model, d / n, name=n)
    return base, singles, model, d


def test_load_list_and_switch(setup):
    base, singles, model, _ = setup
    assert lk.list_adapters(model) == ["chat", "code", "math"]
    assert lk.active_adapter(model) == "math"  # the first one loaded; later ones wait
    for n in SPECS:
        lk.set_adapter(model, n)
        assert lk.active_adapter(model) == n
        torch.testing.assert_close(logits(model), logits(singles[n]), rtol=1e-5, atol=1e-5)
    lk.set_adapter(model, None)
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        lk.set_adapter(model, "nope")
    lk.set_adapter(model, "math")


def test_use_adapter_and_disable_are_temporary_and_touch_no_weight(setup):
    base, singles, model, _ = setup
    lk.set_adapter(model, "math")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with lk.use_adapter(model, "code"):
        torch.testing.assert_close(logits(model), logits(singles["code"]), rtol=1e-5, atol=1e-5)
    assert lk.active_adapter(model) == "math"
    with lk.disable_adapters(model):
        assert torch.equal(logits(model), logits(base))
    torch.testing.assert_close(logits(model), logits(singles["math"]), rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_training_one_adapter_leaves_the_others_byte_identical(setup):
    _, _, model, _ = setup
    model = copy.deepcopy(model)
    lk.set_adapter(model, "code")
    others = {n: {k: v.clone() for k, v in lk.saving.adapter_state_dict(model, n).items()} for n in ("math", "chat")}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and len(trainable) == 2 * len(lk.saving.adapter_factors(model, "code"))
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
    for n, tensors in others.items():
        now = lk.saving.adapter_state_dict(model, n)
        assert all(torch.equal(now[k], v) for k, v in tensors.items()), n
        assert not any(t.requires_grad for t in now.values())


def test_hot_swap_in_place_and_strict(setup, tmp_path):
    base, singles, model, d = setup
    model = copy.deepcopy(model)
    lk.set_adapter(model, "math")
    params_before = {id(p) for p in model.parameters()}
    # new weights for "math" from another file with the same config
    other = random_adapter(base, "math", tmp_path, seed=42)
    lk.load_adapters(model, tmp_path / "math", name="math")
    assert {id(p) for p in model.parameters()} == params_before  # no re-wrapping, same parameters
    torch.testing.assert_close(logits(model), logits(other), rtol=1e-5, atol=1e-5)
    # a bad file (the "code" adapter's weights under math's name) changes nothing
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lk.LoraFileError):
        lk.load_adapters(model, d / "code", name="math")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_delete_adapter_unwraps_layers_left_empty(setup):
    base, _, model, _ = setup
    model = copy.deepcopy(model)
    lk.delete_adapter(model, "chat")
    assert lk.list_adapters(model) == ["code", "math"]
    assert "model.layers.0.mlp.gate_proj" not in lk.lora_layers(model)  # only "chat" was there
    assert type(model.model.layers[0].mlp.gate_proj) is nn.Linear
    lk.delete_adapter(model, "math")
    lk.delete_adapter(model, "code")
    assert not lk.lora_layers(model)
    assert torch.equal(logits(model), logits(base))


def test_adapters_cost_their_own_bytes_never_a_base_copy(setup):
    base, _, model, d = setup
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    adapters = sum(t.numel() * t.element_size() for n in SPECS for t in lk.saving.adapter_state_dict(model, n).values())
    assert total == base_bytes + adapters


@pytest.mark.parametrize("rows", [["math", "code", None, "chat"], ["chat", "chat", "math", None], [None] * 4])
def test_mixed_batch_equals_each_row_alone(setup, rows):
    base, singles, model, _ = setup
    with lk.mixed_batch(model, rows):
        got = logits(model)
    assert all(layer.mixed is None for layer in lk.lora_layers(model).values())
    for i, n in enumerate(rows):
        want = logits(singles[n] if n else base, IDS[i : i + 1])
        torch.testing.assert_close(got[i : i + 1], want, rtol=1e-4, atol=1e-5)


def test_mixed_batch_with_conv_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model = lk.apply_lora(copy.deepcopy(net), lk.LoraConfig(rank=2, alpha=2), ["0", "2"], adapter_name="a")
    lk.combine_adapters(model, {"a": 3.0}, "b")
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.lora_B.normal_()
    x = torch.randn(3, 3, 5, 5)
    with torch.no_grad(), lk.mixed_batch(model, ["b", None, "a"]):
        got = model(x)
    with torch.no_grad():
        want_a = model(x[2:3])
        with lk.use_adapter(model, "b"):
            want_b = model(x[0:1])
        torch.testing.assert_close(got[0:1], want_b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1:2], net(x[1:2]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[2:3], want_a, rtol=1e-5, atol=1e-5)


def test_combine_cat_is_exact(setup):
    _, _, model, _ = setup
    model = copy.deepcopy(model)
    report = lk.combine_adapters(model, {"math": 0.7, "code": -0.4}, "mix", method="cat")
    assert report.max_relative_error < 1e-5
    q = "model.layers.0.self_attn.q_proj"
    assert report.ranks[q] == 4 and report.ranks["model.layers.0.self_attn.o_proj"] == 2
    layer = lk.lora_layers(model)[q]
    with lk.use_adapter(model, "mix"):
        got = layer.weight_delta()
    with lk.use_adapter(model, "math"):
        want = 0.7 * layer.weight_delta()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_combine_svd_reports_its_error_and_linear_needs_equal_ranks(setup):
    _, _, model, _ = setup
    model = copy.deepcopy(model)
    full = lk.combine_adapters(model, {"math": 1.0, "chat": 1.0}, "full", method="svd", rank=12)
    assert full.max_relative_error < 1e-4  # rank 4 + 8 fits in 12
    small = lk.combine_adapters(model, {"math": 1.0, "chat": 1.0}, "small", method="svd", rank=2)
    q = "model.layers.1.self_attn.q_proj"
    layer = lk.lora_layers(model)[q]
    with lk.use_adapter(model, "small"):
        approx = layer.weight_delta()
    with lk.use_adapter(model, "full"):
        exact = layer.weight_delta()
    measured = ((approx - exact).norm() / exact.norm()).item()
    assert small.relative_error[q] > 0.01 and abs(measured - small.relative_error[q]) < 1e-3
    with pytest.raises(ValueError, match="equal ranks"):
        lk.combine_adapters(model, {"math": 1.0, "chat": 1.0}, "lin", method="linear")
    lin = lk.combine_adapters(model, {"math": 0.5}, "lin", method="linear")
    assert lin.max_relative_error < 1e-5  # one adapter: no cross terms, exact


def test_bias_all_adapter_cannot_sit_beside_others(setup, tmp_path):
    base, _, model, _ = setup
    m = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=2, bias="all"), ["q_proj"])
    lk.save_adapters(m, tmp_path)
    target = copy.deepcopy(model)
    state = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(lk.LoraFileError, match="bias='all'"):
        lk.load_adapters(target, tmp_path, name="biased")
    assert target.state_dict().keys() == state.keys()


def test_save_a_named_adapter(setup, tmp_path):
    base, singles, model, _ = setup
    lk.save_adapters(model, tmp_path, name="code")  # not the active one
    torch.testing.assert_close(
        logits(lk.load_adapters(copy.deepcopy(base), tmp_path)), logits(singles["code"]), rtol=1e-5, atol=1e-5
    )


def test_reserved_and_bad_names(setup, tmp_path):
    _, _, model, d = setup
    for bad in ("half", "a.b", ""):
        with pytest.raises(ValueError, match="adapter name"):
            lk.load_adapters(copy.deepcopy(model), d / "math", name=bad)


def _two_adapter_mlp():
    torch.manual_seed(0)
    model = lk.apply_lora(
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)),
        lk.LoraConfig(rank=2, alpha=2),
        ["0", "2"],
        adapter_name="a",
    )
    lk.combine_adapters(model, {"a": -1.5}, "b")
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            for n in layer.adapters.names():
                layer.adapters.tensors(n)["lora_B"].normal_()
    return model


def _rows_alone(model, x, rows):
    """Each row through the model with its own adapter active (the reference for a mixed batch)."""
    out = []
    for i, n in enumerate(rows):
        if n is None:
            with lk.disable_adapters(model):
                out.append(model(x[i : i + 1]))
        else:
            with lk.use_adapter(model, n):
                out.append(model(x[i : i + 1]))
    return torch.cat(out)


@pytest.mark.parametrize("change", ["data", "to_float64", "in_place"])
def test_mixed_batch_stacks_follow_factor_changes(change):
    """Regression: the per-layer stacks were cached on (id, version) of A and B, which `A.data = ...` and
    `model.to(torch.float64)` leave as they were: the next mixed batch used the old values (or crashed on dtypes)."""
    model = _two_adapter_mlp()
    rows = ["a", None, "b"]
    x = torch.randn(3, 8)
    with torch.no_grad():
        with lk.mixed_batch(model, rows):
            model(x)  # builds the stacks
        layer = model[0]
        if change == "data":
            layer.lora_A.data = torch.randn(layer.lora_A.shape)
            layer.stash["b"].lora_B.data = torch.randn(layer.stash["b"].lora_B.shape)
        elif change == "to_float64":
            model.to(torch.float64)
            x = x.double()
        else:
            layer.lora_A.mul_(3)
        with lk.mixed_batch(model, rows):
            got = model(x)
        torch.testing.assert_close(got, _rows_alone(model, x, rows), rtol=1e-5, atol=1e-6)


def test_adapter_changes_inside_a_mixed_batch_are_refused():
    """Regression: use_adapter / disable_adapters inside mixed_batch were silently ignored."""
    model = _two_adapter_mlp()
    rows = ["a", "b"]
    x = torch.randn(2, 8)
    with torch.no_grad():
        want = _rows_alone(model, x, rows)
        with lk.mixed_batch(model, rows):
            for enter in (
                lambda: lk.use_adapter(model, "b"),
                lambda: lk.disable_adapters(model),
                lambda: lk.mixed_batch(model, ["b", "a"]),
            ):
                with pytest.raises(lk.LoraStateError, match="inside a mixed_batch"), enter():
                    pass
            for call in (
                lambda: lk.set_adapter(model, "b"),
                lambda: lk.delete_adapter(model, "b"),
                lambda: lk.combine_adapters(model, {"a": 1.0}, "c"),
                lambda: model[0].merge_(),
            ):
                with pytest.raises(lk.LoraStateError, match="inside a mixed_batch"):
                    call()
            torch.testing.assert_close(model(x), want)  # nothing changed
        assert lk.active_adapter(model) == "a" and lk.list_adapters(model) == ["a", "b"]
        with (
            lk.disable_adapters(model),
            pytest.raises(lk.LoraStateError, match="disable_adapters"),
            lk.mixed_batch(model, rows),
        ):
            pass


@pytest.mark.parametrize("batch", [1, 3])
def test_mixed_batch_with_the_wrong_number_of_rows_names_both_counts(batch):
    """Regression: rows != batch size gave a torch internals error from bmm."""
    model = _two_adapter_mlp()
    with (
        torch.no_grad(),
        lk.mixed_batch(model, ["a", "b"]),
        pytest.raises(lk.LoraStateError, match=f"given 2 rows .* batch has {batch}"),
    ):
        model(torch.randn(batch, 8))


def test_unknown_adapter_names_raise_a_lorakit_key_error():
    """Regression: unknown names raised a bare KeyError; now LoraAdapterNotFound (a KeyError) naming what there is."""
    model = _two_adapter_mlp()
    calls = [
        lambda: lk.set_adapter(model, "nope"),
        lambda: lk.delete_adapter(model, "nope"),
        lambda: lk.mixed_batch(model, ["nope"]).__enter__(),
        lambda: lk.use_adapter(model, "nope").__enter__(),
        lambda: lk.combine_adapters(model, {"nope": 1.0}, "c"),
    ]
    for call in calls:
        with pytest.raises(lk.LoraAdapterNotFound, match=r"no adapter named 'nope'; the model has \['a', 'b'\]"):
            call()
    for call in (
        lambda: model[0].adapters.activate("nope"),
        lambda: model[0].adapters.factors("nope"),
        lambda: model[0].adapters.delete("nope"),
    ):
        with pytest.raises(KeyError, match=r"adapter 'nope' is not on this layer; it has \['a', 'b'\]") as e:
            call()
        assert isinstance(e.value, lk.LoraError)
    assert lk.list_adapters(model) == ["a", "b"] and lk.active_adapter(model) == "a"


def test_disable_adapters_runs_the_original_of_a_trained_copy():
    """Regression: disable_adapters left a TrainedCopy (modules_to_save) running its trained copy, so the
    "bare base" inside the block still had the trained head. PEFT switches it to the original module."""
    base = llama()
    model = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=2), ["q_proj", "v_proj"], modules_to_save=["lm_head"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # LoRA factors and the head's trained copy
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    adapted = logits(model)
    assert not torch.allclose(adapted, logits(base))
    with lk.disable_adapters(model):
        assert torch.equal(logits(model), logits(base))
        with lk.disable_adapters(model):  # nested: the outer block still runs the base after the inner one
            pass
        assert torch.equal(logits(model), logits(base))
    assert torch.equal(logits(model), adapted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_mixed_batch_rows_without_an_adapter_are_the_conv1d_base_bit_for_bit(dtype):
    """Rows with no adapter (None) or a fresh one (B = 0) compute the base with the base's own GEMM: GPT-2's
    Conv1D is addmm on its stored (d_in, d_out) weight, which the mixed path ran as F.linear on a transposed
    view (the same numbers only where the two GEMM calls round alike, which depends on the CPU)."""
    import _tiny_models

    base = _tiny_models.gpt2().to(dtype)
    model = lk.apply_lora(
        copy.deepcopy(base), lk.LoraConfig(rank=2, alpha=4), ["c_attn", "c_proj", "c_fc"], adapter_name="fresh"
    )
    lk.combine_adapters(model, {"fresh": 1.0}, "trained")
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.adapters.tensors("trained")["lora_B"].normal_()  # "trained" moves its rows; the others must not
    rows = [None, "fresh", "trained", None]
    ids = IDS[: len(rows)]
    with torch.no_grad(), lk.mixed_batch(model, rows):
        got = model(ids).logits
    want = logits(base, ids)  # the base on the same batch: same GEMM shapes
    for i, name in enumerate(rows):
        if name != "trained":
            assert torch.equal(got[i], want[i]), (name, (got[i] - want[i]).abs().max())
    assert not torch.allclose(got[2], want[2])
