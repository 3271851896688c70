import math

import pytest

import lorakit as lk


def test_scaling_plain_and_rslora():
    assert lk.LoraConfig(rank=4, alpha=8.0).scaling == 2.0
    assert lk.LoraConfig(rank=4, alpha=8.0, use_rslora=True).scaling == 4.0
    assert lk.LoraConfig(rank=3).alpha == 1.0


def test_defaults_and_bias_enum():
    cfg = lk.LoraConfig(rank=2)
    assert (cfg.alpha, cfg.dropout, cfg.bias, cfg.use_rslora, cfg.init) == (1.0, 0.0, "none", False, "kaiming")
    assert lk.LoraConfig(rank=2, bias=lk.LoraBias.ALL).bias == "all"
    assert lk.LoraConfig(rank=2, bias="all").bias is lk.LoraBias.ALL


def test_frozen():
    cfg = lk.LoraConfig(rank=2)
    with pytest.raises(AttributeError):
        cfg.rank = 3


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("rank", 0, "int >= 1"),
        ("rank", 2.0, "int >= 1"),
        ("rank", True, "int >= 1"),
        ("rank", -1, "int >= 1"),
        ("alpha", 0, "> 0"),
        ("alpha", -1.0, "> 0"),
        ("alpha", math.inf, "finite"),
        ("alpha", math.nan, "finite"),
        ("alpha", "8", "finite"),
        ("dropout", 1.0, "[0, 1)"),
        ("dropout", -0.1, "[0, 1)"),
        ("dropout", "0.1", "[0, 1)"),
        ("bias", "lora_only", "'none', 'all'"),
        ("init", "loftq", "'kaiming', 'gaussian'"),
        ("use_rslora", 1, "True or False"),
        ("rank_pattern", {"q": 0}, "int >= 1"),
        ("alpha_pattern", {"q": -2}, "> 0"),
        ("rank_pattern", [1], "dict"),
    ],
)
def test_invalid_values_name_field_value_and_allowed(field, value, needle):
    kwargs = {"rank": 4, field: value}
    with pytest.raises(ValueError) as e:
        lk.LoraConfig(**kwargs)
    msg = str(e.value)
    shown = repr(next(iter(value.values()))) if isinstance(value, dict) else repr(value)
    assert field in msg and shown in msg and needle in msg


def test_for_module_uses_peft_pattern_rules():
    cfg = lk.LoraConfig(rank=4, alpha=8, rank_pattern={"q_proj": 8, "^mlp\\.up$": 2}, alpha_pattern={"k_proj": 3})
    assert cfg.for_module("layers.0.attn.q_proj").rank == 8
    assert cfg.for_module("layers.0.attn.xq_proj").rank == 4  # dot boundary, never substring
    assert cfg.for_module("mlp.up").rank == 2
    assert cfg.for_module("block.mlp.up").rank == 4  # anchored key is exact
    k = cfg.for_module("layers.0.attn.k_proj")
    assert (k.rank, k.alpha, k.rank_pattern) == (4, 3.0, {})


def test_to_dict_round_trip():
    cfg = lk.LoraConfig(
        rank=4, alpha=8, dropout=0.1, bias="all", use_rslora=True, init="gaussian", rank_pattern={"a": 2}
    )
    assert lk.LoraConfig(**cfg.to_dict()) == cfg


def test_configs_hash_and_patterns_stay_dict_like():
    """Regression: hash(LoraConfig(...)) raised (a frozen dataclass holding dicts)."""
    a = lk.LoraConfig(rank=4, rank_pattern={"q": 8}, alpha_pattern={"k": 3})
    b = lk.LoraConfig(rank=4, rank_pattern={"q": 8}, alpha_pattern={"k": 3.0})
    assert hash(a) == hash(b) and a == b and len({a, b, lk.LoraConfig(rank=4)}) == 2
    assert a.rank_pattern["q"] == 8 and dict(a.alpha_pattern) == {"k": 3.0} and "q" in a.rank_pattern
    assert a.rank_pattern == {"q": 8} and a.for_module("x.k").rank_pattern == {}
    d = a.to_dict()
    assert type(d["rank_pattern"]) is dict and d["rank_pattern"] == {"q": 8}
    assert lk.LoraConfig(**d) == a
    with pytest.raises(TypeError):
        a.rank_pattern["q"] = 2  # read-only, as the rest of a frozen config


def test_unknown_init_lists_every_init():
    """Regression: ops.init_factors_ listed 2 of the 4 inits."""
    import torch

    from lorakit import config, ops

    with pytest.raises(ValueError) as e:
        ops.init_factors_(torch.empty(2, 4), torch.empty(4, 2), "loftq")
    assert all(repr(i) in str(e.value) for i in config.INITS) and "'loftq'" in str(e.value)
