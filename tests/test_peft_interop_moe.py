"""Expert adapters (target_parameters) in PEFT's current layout, both ways, on three MoE families: PEFT 0.21 loads
what lorakit saves and computes lorakit's logits; lorakit loads what PEFT saves (into a bare model, into an adapter
it has, as a named one) and computes PEFT's; a file whose expert tensors do not fit the model is refused, the
model left as it was."""

import copy
import json
import re
import warnings

import peft
import pytest
import torch
from _moe_models import BUILDERS
from _peft_writer import IDS
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit.errors import LayoutNote, LoraBaseMismatch, LoraFileError
from lorakit.files.inspect import describe, render

PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
RANK, ALPHA = 2, 4


def _randomize(model, seed):
    """Every LoRA factor drawn at N(0, 0.3²), seeded, so the adapter moves the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape) * 0.3)


def _logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request, tmp_path_factory):
    """One family: its base and base logits, a lorakit-saved adapter and a PEFT-saved one, with their logits."""
    import peft

    base = BUILDERS[request.param]()
    out = tmp_path_factory.mktemp(request.param)
    ours = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=RANK, alpha=ALPHA), target_parameters=PARAMS)
    _randomize(ours, 1)
    lk.save_adapters(ours, out / "lorakit")
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[], target_parameters=PARAMS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    _randomize(theirs, 2)
    theirs.save_pretrained(out / "peft")
    return {
        "name": request.param,
        "base": base,
        "base_logits": _logits(base),
        "lorakit": out / "lorakit",
        "lorakit_logits": _logits(ours),
        "peft": out / "peft",
        "peft_logits": _logits(theirs),
    }


def test_peft_loads_lorakit_expert_adapter(family):
    import peft

    saved = load_file(family["lorakit"] / "adapter_model.safetensors")
    peft_made = load_file(family["peft"] / "adapter_model.safetensors")
    assert {k: tuple(t.shape) for k, t in saved.items()} == {k: tuple(t.shape) for k, t in peft_made.items()}
    config = json.loads((family["lorakit"] / "adapter_config.json").read_text())
    assert config["target_modules"] == [] and len(config["target_parameters"]) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(family["base"]), family["lorakit"])
    assert (family["lorakit_logits"] - family["base_logits"]).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(_logits(loaded), family["lorakit_logits"], atol=1e-5, rtol=1e-5)


def test_lorakit_loads_peft_expert_adapter(family):
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayoutNote)  # PEFT 0.21's layout: nothing converted, nothing to note
        model = lk.load_adapters(copy.deepcopy(family["base"]), family["peft"])
    assert sum(isinstance(layer, lk.LoraParam) for layer in lk.lora_layers(model).values()) == 4
    assert (family["peft_logits"] - family["base_logits"]).abs().max() > 1e-2
    torch.testing.assert_close(_logits(model), family["peft_logits"], atol=1e-5, rtol=1e-5)
    lk.load_adapters(model, family["lorakit"])  # into the adapter it has
    torch.testing.assert_close(_logits(model), family["lorakit_logits"], atol=1e-5, rtol=1e-5)
    lk.load_adapters(model, family["peft"], name="theirs")  # beside it, named
    torch.testing.assert_close(_logits(model), family["lorakit_logits"], atol=1e-5, rtol=1e-5)
    lk.set_adapter(model, "theirs")
    torch.testing.assert_close(_logits(model), family["peft_logits"], atol=1e-5, rtol=1e-5)


def _rewrite(src, dst, change_tensors=None, change_config=None):
    """A copy of adapter `src` at `dst` with its tensors and config changed (no lorakit.json: PEFT-made)."""
    dst.mkdir()
    tensors = load_file(src / "adapter_model.safetensors")
    config = json.loads((src / "adapter_config.json").read_text())
    save_file(change_tensors(tensors) if change_tensors else tensors, dst / "adapter_model.safetensors")
    (dst / "adapter_config.json").write_text(json.dumps(change_config(config) if change_config else config))
    return dst


def _two_experts(tensors):
    """The adapter of a 2-expert model: the first two experts' rows of A and columns of B."""
    out = {}
    for key, t in tensors.items():
        out[key] = t[: 2 * RANK] if "lora_A" in key else t.reshape(t.shape[0], RANK, 4)[:, :, :2].reshape(-1, 2 * RANK)
    return out


def _swapped(tensors):
    """Each expert's A and B exchanged and transposed: the same deltas, in the other layout's shapes."""
    out = {}
    for key in [k for k in tensors if "lora_A" in k]:
        kb = key.replace("lora_A", "lora_B")
        A, B = tensors[key], tensors[kb]
        A_e, B_e = A.reshape(4, RANK, -1), B.reshape(B.shape[0], RANK, 4).permute(2, 0, 1)
        new_A, new_B = B_e.transpose(1, 2), A_e.transpose(1, 2)  # (E, r, out), (E, in, r)
        out[key] = new_A.reshape(4 * RANK, -1).contiguous()
        out[kb] = new_B.permute(1, 2, 0).reshape(new_B.shape[1], -1).contiguous()
    return out


def _refused(family, directory, match):
    model = copy.deepcopy(family["base"])
    with pytest.raises(LoraFileError, match=match):
        lk.load_adapters(model, directory)
    assert not lk.lora_layers(model)  # left as it was: the base, unwrapped
    torch.testing.assert_close(_logits(model), family["base_logits"], atol=0, rtol=0)


def test_adapter_for_another_expert_count_is_refused(family, tmp_path):
    wrong = _rewrite(family["peft"], tmp_path / "two", _two_experts)
    _refused(family, wrong, r"parameter 'model\.layers\.0\.mlp\.experts\.\w+' of shape \(4, \d+, \d+\) \(4 experts, "
             r"rank 2\).*found lora_A \(4, \d+\), lora_B \(\d+, 4\); expected PEFT >= 0\.19: lora_A \(8, ")  # fmt: skip


def test_swapped_layout_is_refused_or_converted(family, tmp_path):
    if family["name"] == "gpt_oss":  # transposed experts: both layouts are one, so a swap is another shape
        swapped = _rewrite(family["peft"], tmp_path / "swapped", _swapped)
        _refused(family, swapped, r"parameter 'model\.layers\.0\.mlp\.experts\.\w+' of shape .* found lora_A")
        return
    # the other layout's shapes under a version that says this one: refused, never read as either
    contradicting = _rewrite(family["peft"], tmp_path / "contradicting", _swapped)
    version = re.escape(peft.__version__)  # the installed PEFT wrote the file
    _refused(family, contradicting, rf"peft_version '{version}' writes the PEFT >= 0\.19 layout, but the tensors")
    # the same tensors with the version that wrote that layout: converted, with a note, to the same logits
    legacy = _rewrite(family["peft"], tmp_path / "legacy", _swapped, lambda c: {**c, "peft_version": "0.18.1"})
    with pytest.warns(LayoutNote, match=r"PEFT <= 0\.18 layout \(peft_version '0\.18\.1'"):
        model = lk.load_adapters(copy.deepcopy(family["base"]), legacy)
    torch.testing.assert_close(_logits(model), family["peft_logits"], atol=1e-5, rtol=1e-5)


def test_sidecar_fingerprints_the_adapted_parameters(family, tmp_path):
    sidecar = json.loads((family["lorakit"] / "lorakit.json").read_text())
    assert "model.layers.1.mlp.experts.gate_up_proj" in sidecar["base"]["modules"]
    merged = lk.merge_(lk.load_adapters(copy.deepcopy(family["base"]), family["lorakit"]))
    again = json.loads((lk.save_adapters(merged, tmp_path / "again") / "lorakit.json").read_text())
    assert again["base"] == sidecar["base"]  # merged in place, the base is still the one before the merge
    other = copy.deepcopy(family["base"])
    with torch.no_grad():
        other.model.layers[1].mlp.experts.gate_up_proj[3, 0, 0] += 1.0
    with pytest.raises(LoraBaseMismatch, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj"):
        lk.load_adapters(other, family["lorakit"])
    assert not lk.lora_layers(other)


def test_inspect_shows_expert_parameters(family):
    info = describe(family["lorakit"])
    assert info["target_parameters"] and len(info["modules"]) == 4
    assert {m["kind"] for m in info["modules"]} == {"parameter, 4 experts"} and info["ranks"] == [RANK]
    assert "expert layout" in render(info) and "PEFT >= 0.19" in info["expert_layout"]


def test_four_nested_parameters_with_biases_both_ways(tmp_path):
    """gpt-oss with LoRA on its expert weights and biases: four ParamWrappers nested on one module, keyed by depth."""
    import peft

    rules = [*PARAMS, "experts.gate_up_proj_bias", "experts.down_proj_bias"]
    base = BUILDERS["gpt_oss"]()
    ours = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=RANK, alpha=ALPHA), target_parameters=rules)
    _randomize(ours, 3)
    saved = load_file(lk.save_adapters(ours, tmp_path / "four") / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[], target_parameters=rules)
        theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "four")
    peft_keys = {k.replace(".default", ""): tuple(v.shape) for k, v in theirs.state_dict().items() if "lora_" in k}
    assert {k: tuple(v.shape) for k, v in saved.items()} == peft_keys
    assert any(".base_layer.base_layer.base_layer.lora_A" in k for k in saved)
    torch.testing.assert_close(_logits(loaded), _logits(ours), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(lk.load_adapters(copy.deepcopy(base), tmp_path / "four")), _logits(ours))
