"""apply_lora, targeting, freezing, merge, counts and summary."""

import copy

import pytest
import torch
from torch import nn

import lorakit as lk


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.xq_proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.q_proj(x) + self.xq_proj(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.layers:
            h = block(h)
        return self.head(h)


def wrapped_names(model):
    return sorted(lk.lora_layers(model))


def randomise(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
    return model


CFG = lk.LoraConfig(rank=2, alpha=4)


@pytest.mark.parametrize(
    "targets,expected",
    [
        (["q_proj"], ["layers.0.q_proj", "layers.1.q_proj"]),  # suffix at a dot boundary, never "xq_proj"
        (["layers.0.q_proj"], ["layers.0.q_proj"]),  # exact
        ("re:layers\\.1\\..*proj", ["layers.1.q_proj", "layers.1.xq_proj"]),  # full-match regex
        (["re:.*q_proj"], ["layers.0.q_proj", "layers.0.xq_proj", "layers.1.q_proj", "layers.1.xq_proj"]),
        ("all-linear", ["layers.0.q_proj", "layers.0.xq_proj", "layers.1.q_proj", "layers.1.xq_proj"]),  # head excluded
        (["embed", "head"], ["embed", "head"]),
    ],
)
def test_target_rules(targets, expected):
    model = lk.apply_lora(Net(), CFG, targets=targets)
    assert wrapped_names(model) == expected


def test_apply_freezes_everything_else_and_keeps_outputs():
    model = Net()
    ids = torch.randint(0, 20, (2, 5))
    before = model(ids)
    out = lk.apply_lora(model, CFG, targets="all-linear")
    assert out is model
    assert torch.allclose(model(ids), before, atol=1e-6)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    t, total = lk.trainable_parameters(model)
    assert t == 4 * (2 * 8 + 8 * 2) and total == sum(p.numel() for p in model.parameters())


def test_modules_to_save_train_in_full_as_a_copy():
    plain = Net()
    model = lk.apply_lora(Net(), CFG, targets="all-linear", modules_to_save=["head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.trained.weight", "head.trained.bias"} <= trainable  # the copy trains, the original does not
    assert not any(p.requires_grad for p in model.head.original.parameters())
    assert "head" not in lk.lora_layers(model) and not hasattr(model, "lorakit_modules_to_save")
    ids = torch.randint(0, 20, (2, 5))
    step = torch.randn(plain.head.weight.shape)
    with torch.no_grad():
        model.head.trained.weight.add_(step)
    assert torch.equal(model.head.original.weight, plain.head.weight)  # the user's module is never written
    merged = lk.merge(model)
    assert isinstance(merged.head, nn.Linear) and torch.equal(merged.head.weight, plain.head.weight + step)
    assert not torch.allclose(merged(ids), plain(ids))


def test_modules_to_save_on_a_tied_head_leaves_the_embeddings_alone():
    class Tied(Net):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.embed.weight  # tie_word_embeddings

    model = lk.apply_lora(Tied(), CFG, targets=["q_proj"], modules_to_save=["head"])
    assert model.head.original.weight is model.embed.weight and not model.embed.weight.requires_grad
    with torch.no_grad():
        model.head.trained.weight.add_(1.0)
    assert torch.equal(model.embed.weight, Tied().embed.weight)


def _snapshot(model):
    return (
        copy.deepcopy(model.state_dict()),
        [type(m) for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


@pytest.mark.parametrize(
    "targets,error,needle",
    [
        (["nope"], ValueError, "'nope' matches no module"),
        (
            ["q_proj", "missing"],
            ValueError,
            "'missing' matches no module",
        ),  # first rule fine, second bad: nothing changes
        (["norm"], TypeError, "LayerNorm"),
        (["layers.0"], TypeError, "Block"),
        (["re:(unclosed"], ValueError, "not a valid regex"),
        ([], ValueError, "targets"),
    ],
)
def test_bad_targets_leave_model_untouched(targets, error, needle):
    model = Net()
    state, types, grads = _snapshot(model)
    with pytest.raises(error, match=needle) as e:
        lk.apply_lora(model, CFG, targets=targets)
    if "matches no module" in needle:
        assert "can target: embed, q_proj, xq_proj, head (full names like" in str(e.value)  # the layer names,
        assert "norm" not in str(e.value) and "'layers'" not in str(e.value)  # not parents or other modules
    after_state, after_types, after_grads = _snapshot(model)
    assert types == after_types and grads == after_grads
    assert all(torch.equal(v, after_state[k]) for k, v in state.items())


def test_apply_twice_refused_and_untouched():
    model = lk.apply_lora(Net(), CFG, targets=["q_proj"])
    types = [type(m) for m in model.modules()]
    with pytest.raises(lk.LoraStateError, match="already has LoRA"):
        lk.apply_lora(model, CFG, targets=["xq_proj"])
    assert [type(m) for m in model.modules()] == types


def test_merge_replaces_layers_with_equal_outputs():
    model = randomise(lk.apply_lora(Net(), CFG, targets="all-linear"))
    ids = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        want = model(ids)
        merged = lk.merge(model)
        assert not lk.lora_layers(merged)
        assert all(
            type(m) in (nn.Linear, nn.Embedding, nn.LayerNorm, nn.ModuleList, Block, Net) for m in merged.modules()
        )
        torch.testing.assert_close(merged(ids), want, rtol=1e-5, atol=1e-6)


def test_model_inplace_merge_unmerge_exact():
    model = randomise(lk.apply_lora(Net(), CFG, targets="all-linear"))
    ids = torch.randint(0, 20, (2, 5))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        want = model(ids)
        lk.merge_(model)
        torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-6)
        with pytest.raises(lk.LoraStateError):
            lk.merge_(model)
        lk.unmerge_(model)
        with pytest.raises(lk.LoraStateError):
            lk.unmerge_(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_rank_pattern_applies_per_module():
    cfg = lk.LoraConfig(rank=2, alpha=4, rank_pattern={"layers.1.q_proj": 5}, alpha_pattern={"xq_proj": 1})
    model = lk.apply_lora(Net(), cfg, targets="all-linear")
    layers = lk.lora_layers(model)
    assert layers["layers.1.q_proj"].rank == 5 and layers["layers.0.q_proj"].rank == 2
    assert layers["layers.0.xq_proj"].config.alpha == 1.0 and layers["layers.0.q_proj"].config.alpha == 4.0


def test_summary_table():
    model = lk.apply_lora(Net(), CFG, targets=["q_proj"])
    text = lk.summary(model)
    assert "layers.0.q_proj" in text and "2×8" in text and "8×2" in text
    t, total = lk.trainable_parameters(model)
    assert f"trainable {t:,} of {total:,}" in text


def test_trainable_parameters_counts_shared_once():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, lin)
    assert lk.trainable_parameters(model) == (20, 20)


def test_apply_lora_runs_the_layers_own_target_check_on_every_target_first(monkeypatch):
    """One place checks whether a layer class can wrap a module (`LoraLayer.check_target`): `with_lora` runs it, and
    `apply_lora` runs the same check on every target before it wraps the first."""
    from lorakit import layers

    class Narrow(lk.LoraLinear):
        @classmethod
        def check_target(cls, base, config):
            super().check_target(base, config)
            if base.in_features > 4:
                raise TypeError(f"{base.in_features} inputs, at most 4")

    monkeypatch.setitem(layers.LORA_LAYERS, (nn.Linear, "lora"), Narrow)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    with pytest.raises(TypeError, match="'1': 8 inputs, at most 4"):
        lk.apply_lora(model, lk.LoraConfig(rank=2), ["0", "1"])
    assert type(model[0]) is nn.Linear and all(p.requires_grad for p in model.parameters())  # nothing changed
    with pytest.raises(TypeError, match="8 inputs"):
        lk.with_lora(model[1], lk.LoraConfig(rank=2))
    assert type(lk.with_lora(model[0], lk.LoraConfig(rank=2))) is Narrow
