"""Adapter provenance: lorakit.json records the base an adapter was saved for (every tensor of its forward and
its config), the adapter config's computation fields and its tensors' hashes; a load refuses another base (any
tensor or config field changed), an edited config and a file changed since saving, notes a PEFT-made adapter it
cannot check and an older sidecar, and accepts a QLoRA adapter on the full-precision base its copy came from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lorakit as lk  # noqa: E402
from lorakit.files import provenance  # noqa: E402
from lorakit.fingerprint import Fingerprints  # noqa: E402
from lorakit.hf import models as hf  # noqa: E402
from lorakit.variants.quant import quantize_base  # noqa: E402

transformers.utils.logging.set_verbosity_error()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TARGETS = ["q_proj", "v_proj"]
CHANGED = "model.layers.1.self_attn.v_proj"  # the one weight the other base changes


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """ "base": a tiny Llama; "other": the same shapes and weights but for one targeted module (another fine-tune)."""
    root = tmp_path_factory.mktemp("bases")
    base = _hf_models.save_tiny("llama", root / "base")
    model = hf.load_model(base, "causal-lm")
    with torch.no_grad():
        model.get_submodule(CHANGED).weight.add_(1e-2)
    model.save_pretrained(root / "other")
    hf.load_tokenizer(base).save_pretrained(root / "other")
    return {"base": base, "other": root / "other"}


def _trained(model: torch.nn.Module, **config) -> torch.nn.Module:
    """LoRA on q/v with B filled, so the adapter changes the output."""
    lk.apply_lora(model, lk.LoraConfig(rank=2, **config), TARGETS)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)
    return model


@pytest.fixture(scope="module")
def adapter(bases, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "a"
    lk.save_adapters(_trained(hf.load_model(bases["base"], "causal-lm"), alpha=8.0), out)
    hf.write_task_file(out, "causal-lm")
    return out


def _notes(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, lk.ProvenanceNote)]


def _load(model_dir, adapter_dir, **kw) -> tuple[torch.nn.Module, list[str]]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = lk.load_adapters(hf.load_model(model_dir, "causal-lm"), adapter_dir, **kw)
    return model, _notes(record)


def test_sidecar_records_the_base_and_the_right_base_loads_silently(bases, adapter):
    saved = json.loads((adapter / "lorakit.json").read_text())
    assert saved["format"] == 2 and saved["base"]["path"] == str(bases["base"].resolve())
    assert saved["base"]["config"]["model_type"] == "llama" and saved["base"]["config"]["hidden_size"] == 32
    assert saved["base"]["config_sha256"] == provenance.file_digest(bases["base"] / "config.json")
    assert sorted(saved["base"]["modules"]) == sorted(
        f"model.layers.{i}.self_attn.{t}" for i in (0, 1) for t in TARGETS
    )
    assert sorted(saved["tensors"]) == sorted(provenance.read(adapter).tensors)
    assert (
        saved["base"]["config"]["rope_parameters"]["rope_theta"] == 10000.0
        and "rms_norm_eps" in saved["base"]["config"]
    )
    others = set(saved["base"]["tensors"])  # every other tensor of the forward: norms, embeddings, projections
    assert {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.0.self_attn.k_proj.weight",
    } <= others
    assert len(others) + len(saved["base"]["modules"]) == len(hf.load_model(bases["base"], "causal-lm").state_dict())
    assert saved["adapter_config"]["lora_alpha"] == 8 and saved["adapter_config"]["r"] == 2
    model, notes = _load(bases["base"], adapter)
    assert notes == [] and len(lk.lora_layers(model)) == 4


def test_same_shapes_different_weights_refused_naming_the_module(bases, adapter):
    model = hf.load_model(bases["other"], "causal-lm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lk.LoraBaseMismatch, match="saved for a different base") as e:
        lk.load_adapters(model, adapter)
    assert e.value.differences == [f"{CHANGED!r}: weight values differ"]
    assert str(bases["base"].resolve()) in str(e.value) and "allow_base_mismatch=True" in str(e.value)
    assert not lk.lora_layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    loaded, notes = _load(bases["other"], adapter, allow_base_mismatch=True)
    assert len(lk.lora_layers(loaded)) == 4
    assert len(notes) == 1 and CHANGED in notes[0] and "loading it anyway" in notes[0]


def test_a_base_changed_in_place_after_a_load_is_seen(bases, adapter):
    """The caller's Fingerprints keeps each hash until its tensor changes (tensor version): an in-place change of a
    targeted or of another weight is seen by the next load."""
    fp = Fingerprints()
    model = lk.load_adapters(hf.load_model(bases["base"], "causal-lm"), adapter, name="one", fingerprints=fp)
    assert "model.norm.weight" in fp.records and CHANGED in fp.records  # hashed once, kept by the caller
    lk.load_adapters(model, adapter, name="two", fingerprints=fp)  # the cached hashes: still the right base
    with torch.no_grad():
        model.get_submodule("model.norm").weight.add_(0.05)
    with pytest.raises(lk.LoraBaseMismatch, match="model.norm.weight"):
        lk.load_adapters(model, adapter, name="three", fingerprints=fp)
    with torch.no_grad():
        model.get_submodule("model.norm").weight.sub_(0.05)
        lk.lora_layers(model)[CHANGED].base.weight.mul_(2)
    with pytest.raises(lk.LoraBaseMismatch, match="v_proj"):
        lk.load_adapters(model, adapter, name="three", fingerprints=fp)


def _variant(bases, tmp_path, change) -> torch.nn.Module:
    """The base with one thing changed by `change(model, config_dict)`: a tensor in place, or its config.json."""
    d = tmp_path / "variant"
    d.mkdir()
    for f in bases["base"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    config = json.loads((d / "config.json").read_text())
    change(None, config)
    (d / "config.json").write_text(json.dumps(config))
    model = hf.load_model(d, "causal-lm")
    with torch.no_grad():
        change(model, None)
    return model


VARIANTS = {  # a base that differs from the adapter's only in something its old fingerprint did not cover
    "a norm weight": (
        "tensor 'model.layers.0.input_layernorm.weight'",
        lambda m, c: m and m.get_submodule("model.layers.0.input_layernorm").weight.mul_(1.5),
    ),
    "an embedding row": (
        "tensor 'model.embed_tokens.weight'",
        lambda m, c: m and m.get_submodule("model.embed_tokens").weight[5].add_(0.5),
    ),
    "a non-targeted projection": (
        "tensor 'model.layers.1.mlp.down_proj.weight'",
        lambda m, c: m and m.get_submodule("model.layers.1.mlp.down_proj").weight.add_(1e-2),
    ),
    "rope_theta": ("config rope_parameters", lambda m, c: c and c["rope_parameters"].update(rope_theta=500000.0)),
}


@pytest.mark.parametrize("what", list(VARIANTS))
def test_a_base_differing_only_outside_the_targets_is_refused(what, bases, adapter, tmp_path):
    """The oracle: a different base (one tensor or one config field changed); the load must refuse it by name."""
    named, change = VARIANTS[what]
    model = _variant(bases, tmp_path, change)
    with pytest.raises(lk.LoraBaseMismatch, match="saved for a different base") as e:
        lk.load_adapters(model, adapter)
    assert len(e.value.differences) == 1 and e.value.differences[0].startswith(named), e.value.differences
    assert not lk.lora_layers(model)


EDITS = {  # adapter_config.json edits that change the output though the tensors are the same
    "lora_alpha": lambda c: c.update(lora_alpha=80),
    "use_rslora": lambda c: c.update(use_rslora=True),
    "alpha_pattern": lambda c: c.update(alpha_pattern={"model.layers.0.self_attn.q_proj": 32}),
}


@pytest.mark.parametrize("field", list(EDITS))
def test_an_edited_adapter_config_is_refused_naming_the_field(field, bases, adapter, tmp_path):
    """The oracle: the saved adapter with one field of adapter_config.json edited (its output changes)."""
    copy = tmp_path / "edited"
    copy.mkdir()
    for f in adapter.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    config = json.loads((copy / "adapter_config.json").read_text())
    EDITS[field](config)
    (copy / "adapter_config.json").write_text(json.dumps(config))
    model = hf.load_model(bases["base"], "causal-lm")
    with pytest.raises(lk.LoraFileChanged, match=f"adapter config changed since it was saved \\({field} ") as e:
        lk.load_adapters(model, copy)
    assert str(copy / "adapter_config.json") in str(e.value) and not lk.lora_layers(model)
    config.pop("lora_dropout")  # a field that changes no computation may be edited (or dropped) freely
    config.update(EDIT_BACK := json.loads((adapter / "adapter_config.json").read_text()), lora_dropout=0.3)
    (copy / "adapter_config.json").write_text(json.dumps(config))
    assert EDIT_BACK["lora_dropout"] != 0.3
    lk.load_adapters(model, copy)


def _format_1_sidecar(adapter: Path, model: torch.nn.Module) -> dict:
    """lorakit.json as the previous lorakit wrote it (format 1): sha256 of the targeted weights as bf16 bytes, seven
    config fields, the adapter's tensor hashes; no other base tensor, no adapter config."""
    side = json.loads((adapter / "lorakit.json").read_text())
    fields = (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
    )
    modules = {
        n: {
            "sha256": provenance.weight_digest(model.get_submodule(n).weight),
            "shape": list(model.get_submodule(n).weight.shape),
            "dtype": "float32",
        }
        for n in side["base"]["modules"]
    }
    base = {
        "modules": modules,
        "config": {f: getattr(model.config, f) for f in fields},
        "class": side["base"]["class"],
        "path": side["base"]["path"],
        "config_sha256": side["base"]["config_sha256"],
    }
    return {"format": 1, "base": base, "tensors": side["tensors"]}


def test_a_format_1_sidecar_still_loads_and_checks_what_it_covers(bases, adapter, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for f in adapter.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    (old / "lorakit.json").write_text(json.dumps(_format_1_sidecar(adapter, hf.load_model(bases["base"], "causal-lm"))))
    loaded, notes = _load(bases["base"], old)
    assert len(lk.lora_layers(loaded)) == 4
    assert len(notes) == 1 and "written by an older lorakit, it covers only the targeted weights" in notes[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lk.ProvenanceNote)
        with pytest.raises(lk.LoraBaseMismatch, match=CHANGED):  # what it records is still checked
            lk.load_adapters(hf.load_model(bases["other"], "causal-lm"), old)
        _flip_last_byte(old / "adapter_model.safetensors")
        with pytest.raises(lk.LoraFileChanged):
            lk.load_adapters(hf.load_model(bases["base"], "causal-lm"), old)


def test_the_same_weights_in_bf16_are_the_same_base(bases, adapter):
    model = hf.load_model(bases["base"], "causal-lm", dtype="bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error", lk.ProvenanceNote)
        lk.load_adapters(model, adapter)
    assert len(lk.lora_layers(model)) == 4


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor's data: still a well-formed file
    path.write_bytes(bytes(data))


def test_flipped_byte_in_the_tensors_refused_as_changed_not_damaged(bases, adapter, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in adapter.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    _flip_last_byte(copy / "adapter_model.safetensors")
    model = hf.load_model(bases["base"], "causal-lm")
    with pytest.raises(lk.LoraFileChanged, match="the adapter file changed since it was saved") as e:
        lk.load_adapters(model, copy)
    assert str(copy / "adapter_model.safetensors") in str(e.value) and "changed (1)" in str(e.value)
    assert not lk.lora_layers(model)
    (copy / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes()[:-3])
    with pytest.raises(lk.LoraFileError, match="not a valid safetensors file") as damaged:  # damaged stays damaged
        lk.load_adapters(model, copy)
    assert not isinstance(damaged.value, lk.LoraFileChanged)


def test_a_hot_swap_re_hashes_a_file_edited_after_a_verified_load(bases, adapter, tmp_path):
    """A model skips re-hashing a file it verified whose stamp (inode, size, mtime) is unchanged and settled (over
    2 s old); an edit after that load changes the stamp and is refused, and a fresh file is always hashed."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in adapter.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    weights = copy / "adapter_model.safetensors"
    old = weights.stat().st_mtime_ns - 10**10
    os.utime(weights, ns=(old, old))  # settled: saved 10 s ago
    model, fp = hf.load_model(bases["base"], "causal-lm"), Fingerprints()
    lk.load_adapters(model, copy, name="x", fingerprints=fp)
    assert any(str(weights) in k for k in fp.verified)  # vouched for by its stamp
    lk.load_adapters(model, copy, name="x", fingerprints=fp)  # a hot swap of the same bytes
    _flip_last_byte(weights)  # the edit gives it a new mtime, so a new stamp
    with pytest.raises(lk.LoraFileChanged, match="changed since it was saved"):
        lk.load_adapters(model, copy, name="x", fingerprints=fp)
    os.utime(weights, ns=(old, old))  # an edit that puts the old mtime back by hand is not seen by a stamp (see
    fresh = hf.load_model(bases["base"], "causal-lm")  # docs/provenance.md); a model that never verified it hashes it
    with pytest.raises(lk.LoraFileChanged):
        lk.load_adapters(fresh, copy)


def test_peft_made_adapter_loads_with_one_note(bases, tmp_path):
    base = hf.load_model(bases["base"], "causal-lm")
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    assert not (tmp_path / "peft" / "lorakit.json").exists()
    _, notes = _load(bases["base"], tmp_path / "peft")
    assert notes == [
        f"{tmp_path / 'peft'}: no lorakit.json (a PEFT-made or older adapter): its base could not be checked"
    ]


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_qlora_adapter_loads_onto_the_full_precision_base_and_says_so(fmt, bases, tmp_path):
    model = quantize_base(_trained(hf.load_model(bases["base"], "causal-lm")), fmt)
    lk.save_adapters(model, tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "lorakit.json").read_text())["base"]["modules"]
    assert {m["quantized"] for m in saved.values()} == {fmt} and not any("source" in m for m in saved.values())
    loaded, notes = _load(bases["base"], tmp_path / "q")
    assert len(lk.lora_layers(loaded)) == 4
    assert len(notes) == 1 and f"trained on a {fmt}-quantised copy of this base" in notes[0]
    with pytest.raises(lk.LoraBaseMismatch, match=CHANGED):  # the source is checked, not waved through
        lk.load_adapters(hf.load_model(bases["other"], "causal-lm"), tmp_path / "q")
    requantized = quantize_base(
        lk.apply_lora(hf.load_model(bases["base"], "causal-lm"), lk.LoraConfig(rank=2), TARGETS), fmt
    )
    lk.load_adapters(requantized, tmp_path / "q", name="q")  # onto another quantised copy of the same base


def test_merged_and_pissa_models_record_the_original_weight(bases, adapter, tmp_path):
    merged = lk.load_adapters(hf.load_model(bases["base"], "causal-lm"), adapter)
    lk.merge_(merged)
    lk.save_adapters(merged, tmp_path / "merged")  # hashes the weight merge_ set aside, not the merged one
    assert provenance.read(tmp_path / "merged").base["modules"] == provenance.read(adapter).base["modules"]
    pissa = _trained(hf.load_model(bases["base"], "causal-lm"), init="pissa")
    lk.save_adapters(pissa, tmp_path / "pissa")  # the base holds the residual; the record is the original W
    assert provenance.read(tmp_path / "pissa").base["modules"] == provenance.read(adapter).base["modules"]
    _load(bases["base"], tmp_path / "pissa")


def lorakit(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=120
    )


@pytest.mark.slow
def test_cli_refuses_another_base_with_exit_2_and_loads_it_when_allowed(bases, adapter, tmp_path):
    args = ["generate", "--model", bases["other"], "--adapter", adapter, "--prompt", "hello", "--max-new-tokens", 2]
    refused = lorakit(*args)
    assert refused.returncode == 2, refused.stderr
    assert "saved for a different base" in refused.stderr and CHANGED in refused.stderr
    assert "pass --allow-base-mismatch" in refused.stderr
    allowed = lorakit(*args, "--allow-base-mismatch")
    assert allowed.returncode == 0, allowed.stderr
    assert [line for line in allowed.stderr.splitlines() if line.startswith("note:")] == [
        line for line in allowed.stderr.splitlines() if "loading it anyway" in line
    ]
    assert allowed.stderr.count("loading it anyway") == 1


@pytest.mark.slow
def test_cli_inspect_shows_the_fingerprint_and_whether_a_model_matches(bases, adapter):
    shown = lorakit("inspect", adapter, "--json", "--model", bases["other"])
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)["provenance"]
    assert info["base_path"] == str(bases["base"].resolve()) and info["modules"] == 4
    assert info["matches"] is False and info["differences"] == [f"{CHANGED!r}: weight values differ"]
    text = lorakit("inspect", adapter, "--model", bases["base"])
    assert text.returncode == 0 and f"--model       {bases['base']}: matches" in text.stdout


@pytest.mark.slow
def test_cli_prints_the_peft_note_once(bases, tmp_path):
    pm = peft.get_peft_model(hf.load_model(bases["base"], "causal-lm"), peft.LoraConfig(r=2, target_modules=TARGETS))
    pm.save_pretrained(tmp_path / "peft")
    done = lorakit(
        "generate", "--model", bases["base"], "--adapter", tmp_path / "peft", "--prompt", "hi", "--max-new-tokens", 1
    )
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: {tmp_path / 'peft'}: no lorakit.json (a PEFT-made or older adapter): its base could not be checked"
    ]
