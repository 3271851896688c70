"""load_adapters / load_layer_adapter: the model's state is checked in the plan, before anything changes."""

import json

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.files.peft_format import read_adapter
from lorakit.loading import plan_load

X = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def trained(seed):
    model = lk.apply_lora(mlp(), lk.LoraConfig(rank=2, alpha=4), ["0", "2"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    return model


def out(model):
    with torch.no_grad():
        return model(X)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, before):
    tensors, types = before
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in tensors.items())


@pytest.mark.parametrize("name", [None, "default", "other"])
def test_load_into_a_model_merged_in_place_is_refused(name, tmp_path):
    # before: accepted, and the model kept serving the merged adapter (defect 5)
    lk.save_adapters(trained(seed=2), tmp_path)
    model = lk.merge_(trained(seed=1))
    serving, before = out(model), state(model)
    with pytest.raises(lk.LoraStateError, match="merged in place.*unmerge_"):
        lk.load_adapters(model, tmp_path, name=name)
    assert_unchanged(model, before)
    assert torch.equal(out(model), serving)
    lk.unmerge_(model)
    lk.load_adapters(model, tmp_path, name=name)
    if name == "other":
        lk.set_adapter(model, "other")
    torch.testing.assert_close(out(model), out(trained(seed=2)))


def test_layer_load_into_a_merged_layer_is_refused(tmp_path):
    path = lk.lora_layers(trained(seed=2))["0"].save_adapter(tmp_path / "fc")
    layer = lk.lora_layers(trained(seed=1))["0"].merge_()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(lk.LoraStateError, match="merged in place.*unmerge_"):
        layer.load_adapter(path)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    layer.unmerge_().load_adapter(path)
    assert torch.equal(layer.lora_B, lk.lora_layers(trained(seed=2))["0"].lora_B)


def test_plan_reads_the_model_and_changes_nothing(tmp_path):
    lk.save_adapters(trained(seed=2), tmp_path)
    model = mlp()
    before = state(model)
    plan = plan_load(model, read_adapter(tmp_path))
    assert plan.how == "apply" and sorted(plan.targets) == ["0", "2"] and plan.adapter == "default"
    assert sorted(plan.tensors) == sorted(f"base_model.model.{m}.lora_{f}.weight" for m in "02" for f in "AB")
    assert_unchanged(model, before)


@pytest.mark.parametrize("bias", ["all", "model"])
def test_an_adapter_training_biases_cannot_join_named_adapters(bias, tmp_path):
    biased = lk.apply_lora(mlp(), lk.LoraConfig(rank=2, bias=bias), ["2"])  # only the last layer
    lk.save_adapters(biased, tmp_path)
    model = trained(seed=1)
    before = state(model)
    with pytest.raises(lk.LoraFileError, match="cannot sit beside other named adapters"):
        lk.load_adapters(model, tmp_path, name="biased")
    assert_unchanged(model, before)


def test_modules_to_save_loaded_into_a_lora_model_leave_a_tied_original_alone(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(10, 8)
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight  # tie_word_embeddings

        def forward(self, ids):
            return self.head(self.fc(self.embed(ids)))

    source = lk.apply_lora(Tied(), lk.LoraConfig(rank=2), ["fc"], modules_to_save=["head"])
    with torch.no_grad():
        source.head.trained.weight.mul_(-1.0)
    lk.save_adapters(source, tmp_path)
    model = lk.apply_lora(Tied(), lk.LoraConfig(rank=2), ["fc"])  # LoRA already, no saved modules yet
    lk.load_adapters(model, tmp_path)
    assert isinstance(model.head, lk.TrainedCopy) and model.head.original.weight is model.embed.weight
    assert torch.equal(model.embed.weight, Tied().embed.weight)
    ids = torch.arange(10)[None]
    torch.testing.assert_close(model(ids), source(ids))


@pytest.mark.parametrize(
    "key, value",
    [("exclude_modules", "["), ("target_modules", "(fc"), ("rank_pattern", {"[": 2}), ("alpha_pattern", {"fc(": 2.0})],
)
def test_a_bad_regex_in_the_config_is_a_file_error(tmp_path, key, value):
    """Found by tests/test_fuzz_loader.py: an invalid regex raised re.error from deep inside the loader."""
    model = lk.apply_lora(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(rank=2), ["0"])
    lk.save_adapters(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config[key] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lk.LoraFileError, match="regex"):
        lk.load_adapters(nn.Sequential(nn.Linear(4, 4)), tmp_path)
