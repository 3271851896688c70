"""Adapter directories: round trips and strict, side-effect-free refusal of every kind of bad file."""

import json
import os

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.files import peft_format
from lorakit.files import safetensors as safetensors_io


class Net(nn.Module):
    def __init__(self, hidden=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 3)

    def forward(self, ids):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(self.embed(ids))))))


IDS = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))


CFG = lk.LoraConfig(rank=2, alpha=4)


def trained(cfg=CFG, targets=("embed", "fc1", "fc2"), **kw):
    model = lk.apply_lora(Net(), cfg, targets=list(targets), **kw)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def out(model):
    with torch.no_grad():
        return model(IDS)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


def assert_unchanged(model, snap):
    state, types = snap
    assert [type(m).__name__ for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


@pytest.mark.parametrize("bias", ["none", "all"])
def test_round_trip_into_bare_and_wrapped_models(bias, tmp_path):
    model = trained(lk.LoraConfig(rank=2, alpha=4, bias=bias), modules_to_save=["head"])
    lk.save_adapters(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorakit.json",
    ]
    bare = lk.load_adapters(Net(), tmp_path)
    assert torch.equal(out(bare), out(model))
    assert sorted(lk.lora_layers(bare)) == ["embed", "fc1", "fc2"]
    assert bare.head.trained.weight.requires_grad  # modules_to_save train again after loading
    wrapped = lk.apply_lora(
        Net(), lk.LoraConfig(rank=2, alpha=1, bias=bias), ["embed", "fc1", "fc2"], modules_to_save=["head"]
    )
    lk.load_adapters(wrapped, tmp_path)
    assert torch.equal(out(wrapped), out(model))
    assert lk.lora_layers(wrapped)["fc1"].config.alpha == 4.0


def test_saved_files_use_peft_names(tmp_path):
    lk.save_adapters(trained(lk.LoraConfig(rank=2, bias="all"), modules_to_save=["head"]), tmp_path)
    tensors, meta = safetensors_io.read(tmp_path / "adapter_model.safetensors")
    assert meta == {"format": "pt"}
    assert sorted(tensors) == sorted(
        [
            "base_model.model.embed.lora_embedding_A",
            "base_model.model.embed.lora_embedding_B",
            "base_model.model.fc1.lora_A.weight",
            "base_model.model.fc1.lora_B.weight",
            "base_model.model.fc1.base_layer.bias",
            "base_model.model.fc2.lora_A.weight",
            "base_model.model.fc2.lora_B.weight",
            "base_model.model.fc2.base_layer.bias",
            "base_model.model.head.weight",
            "base_model.model.head.bias",
        ]
    )
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 1.0
    assert cfg["target_modules"] == ["embed", "fc1", "fc2"] and cfg["modules_to_save"] == ["head"]
    assert cfg["bias"] == "lora_only"


def _rewrite(path, edit):
    tensors, meta = safetensors_io.read(path)
    edit(tensors)
    safetensors_io.write(path, tensors, meta)


BAD_FILES = {
    "missing key": (
        lambda t: t.pop("base_model.model.fc1.lora_B.weight"),
        "missing keys \\(1\\): base_model.model.fc1.lora_B",
    ),
    "unexpected key": (
        lambda t: t.update({"base_model.model.fc9.lora_A.weight": torch.zeros(2, 8)}),
        "unexpected keys \\(1\\): base_model.model.fc9",
    ),
    "wrong shape": (
        lambda t: t.update({"base_model.model.fc1.lora_A.weight": torch.zeros(2, 9)}),
        "shape \\(2, 9\\); the model expects \\(2, 8\\)",
    ),
    "wrong dtype": (
        lambda t: t.update({"base_model.model.fc1.lora_A.weight": torch.zeros(2, 8, dtype=torch.int32)}),
        "dtype torch.int32",
    ),
    "nan": (lambda t: t["base_model.model.fc2.lora_B.weight"].fill_(float("nan")), "NaN or Inf"),
    "inf": (lambda t: t["base_model.model.fc2.lora_A.weight"].fill_(float("inf")), "NaN or Inf"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.parametrize("into", ["bare", "wrapped"])
def test_bad_tensors_refused_and_model_unchanged(case, into, tmp_path):
    lk.save_adapters(trained(), tmp_path)
    edit, needle = BAD_FILES[case]
    _rewrite(tmp_path / "adapter_model.safetensors", edit)
    model = Net() if into == "bare" else lk.apply_lora(Net(), lk.LoraConfig(rank=2, alpha=4), ["embed", "fc1", "fc2"])
    snap = snapshot(model)
    with pytest.raises(lk.LoraFileError, match=needle):
        lk.load_adapters(model, tmp_path)
    assert_unchanged(model, snap)


def test_missing_and_unexpected_reported_separately(tmp_path):
    lk.save_adapters(trained(), tmp_path)
    _rewrite(
        tmp_path / "adapter_model.safetensors",
        lambda t: (t.pop("base_model.model.fc1.lora_A.weight"), t.update({"base_model.model.zz.w": torch.zeros(1)})),
    )
    with pytest.raises(lk.LoraFileError) as e:
        lk.load_adapters(Net(), tmp_path)
    assert "missing keys (1): base_model.model.fc1.lora_A.weight" in str(e.value)
    assert "unexpected keys (1): base_model.model.zz.w" in str(e.value)


def test_nonfinite_loads_when_asked(tmp_path):
    lk.save_adapters(trained(), tmp_path)
    _rewrite(tmp_path / "adapter_model.safetensors", BAD_FILES["nan"][0])
    (tmp_path / "lorakit.json").unlink()  # a hand-edited file fails its hashes (tests/files/test_provenance.py)
    model = lk.load_adapters(Net(), tmp_path, allow_nonfinite=True)
    assert torch.isnan(lk.lora_layers(model)["fc2"].lora_B).all()


def test_adapter_for_a_different_base_refused(tmp_path):
    model = lk.apply_lora(Net(hidden=16), lk.LoraConfig(rank=2), ["fc1"])
    lk.save_adapters(model, tmp_path)
    target = Net(hidden=8)
    snap = snapshot(target)
    with pytest.raises(lk.LoraFileError, match="different base"):
        lk.load_adapters(target, tmp_path)
    assert_unchanged(target, snap)


def test_rank_mismatch_into_wrapped_model(tmp_path):
    lk.save_adapters(trained(lk.LoraConfig(rank=2)), tmp_path)
    model = lk.apply_lora(Net(), lk.LoraConfig(rank=3), ["embed", "fc1", "fc2"])
    snap = snapshot(model)
    with pytest.raises(lk.LoraFileError, match="rank 2 in the adapter but 3 in the model"):
        lk.load_adapters(model, tmp_path)
    assert_unchanged(model, snap)


def _edit_config(tmp_path, edit):
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda c: c.update(r="4"), "'r' is '4'; expected an int"),
        (lambda c: c.update(r=0), "rank=0"),
        (lambda c: c.update(lora_alpha=True), "'lora_alpha' is True"),
        (lambda c: c.update(target_modules=5), "'target_modules' is 5"),
        (lambda c: c.update(target_modules=["nothing_here"]), "'nothing_here' matches no module"),
        (lambda c: c.update(peft_type="IA3"), "peft_type 'IA3'"),
        (lambda c: c.pop("r"), "missing key 'r'"),
        (lambda c: c.update(bias="sometimes"), "'bias' is 'sometimes'"),
    ],
)
def test_bad_config_refused(edit, needle, tmp_path):
    lk.save_adapters(trained(), tmp_path)
    _edit_config(tmp_path, edit)
    model = Net()
    snap = snapshot(model)
    with pytest.raises(lk.LoraFileError, match=needle):
        lk.load_adapters(model, tmp_path)
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "content,needle", [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"\xff\xfe", "not valid JSON")]
)
def test_config_not_json(content, needle, tmp_path):
    lk.save_adapters(trained(), tmp_path)
    (tmp_path / "adapter_config.json").write_bytes(content)
    with pytest.raises(lk.LoraFileError, match=needle):
        lk.load_adapters(Net(), tmp_path)


def test_pickle_never_loaded(tmp_path):
    lk.save_adapters(trained(), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    # a pickle that would create a file if anything unpickled it
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(lk.LoraFileError, match="adapter_model.bin is pickle"):
        lk.load_adapters(Net(), tmp_path)
    assert not marker.exists()


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(lk.LoraFileError, match="not an adapter directory"):
        lk.load_adapters(Net(), tmp_path / "nope")
    with pytest.raises(lk.LoraFileError, match="adapter_config.json: no such file"):
        lk.load_adapters(Net(), tmp_path)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    model = trained()
    lk.save_adapters(model, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        lk.lora_layers(model)["fc1"].lora_A.add_(1.0)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        lk.save_adapters(model, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorakit.json",
    ]


def test_save_without_lora_is_an_error(tmp_path):
    with pytest.raises(lk.LoraFileError, match="no LoRA layers"):
        lk.save_adapters(Net(), tmp_path)


def test_ambiguous_names_saved_exactly(tmp_path):
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 4)
            self.inner = nn.Sequential()
            self.inner.add_module("fc1", nn.Linear(4, 4))

        def forward(self, x):
            return self.inner(self.fc1(x))

    torch.manual_seed(0)
    model = lk.apply_lora(Outer(), lk.LoraConfig(rank=2), ["re:fc1"])  # only the top-level fc1
    lk.save_adapters(model, tmp_path)
    torch.manual_seed(0)  # the same base: the adapter's recorded base fingerprint must match
    fresh = lk.load_adapters(Outer(), tmp_path)
    assert sorted(lk.lora_layers(fresh)) == ["fc1"]
    assert peft_format.read_adapter_config(tmp_path).targets == ["re:fc1"]
