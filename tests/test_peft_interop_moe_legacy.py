"""Expert adapters in PEFT's pre-0.19 layout, written by real PEFT 0.18.1 (a child Python, tests/_peft018.py): the
layout is told by peft_version and converted to the same delta PEFT 0.18 computes."""

import json
import warnings

import pytest
import torch
from _moe_models import BUILDERS
from safetensors.torch import load_file

from lorakit.files import expert_layout as el
from lorakit.files.expert_layout import LEGACY, ParamGeometry

pytestmark = pytest.mark.slow  # one child Python importing PEFT 0.18.1 and transformers (~20 s)

RANK, ALPHA = 2, 4
PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
JOBS = [{"name": f, "family": f, "target_parameters": PARAMS, "r": RANK, "alpha": ALPHA} for f in sorted(BUILDERS)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every family's pre-0.19 adapter (and PEFT 0.18's logits and deltas), written by one PEFT 0.18.1 process."""
    import _peft018

    out = tmp_path_factory.mktemp("peft018")
    _peft018.write_adapters(out, JOBS)
    return out


def _owner_params(model):
    """`module.param` -> (parameter, owner is_transposed) of every experts parameter adapted by JOBS."""
    return {
        f"{name}.{p}": (getattr(module, p), bool(module.is_transposed))
        for name, module in model.named_modules()
        if hasattr(module, "num_experts") and hasattr(module, "down_proj")
        for p in ("gate_up_proj", "down_proj")
    }


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_peft_018_file_converts_to_peft_018_delta(written, family):
    config = json.loads((written / family / "adapter_config.json").read_text())
    assert config["peft_version"] == "0.18.1" and sorted(config["target_parameters"]) == sorted(PARAMS)
    tensors = load_file(written / family / "adapter_model.safetensors")
    outputs = load_file(written / f"{family}.outputs.safetensors")
    params = _owner_params(BUILDERS[family]())
    assert len(params) == 4
    for path, (param, transposed) in params.items():
        owner, _, name = path.rpartition(".")
        nest = ".base_layer" if name == "gate_up_proj" else ""  # PEFT nests the first-registered parameter inside
        A = tensors[f"base_model.model.{owner}{nest}.lora_A.weight"]
        B = tensors[f"base_model.model.{owner}{nest}.lora_B.weight"]
        g = ParamGeometry(tuple(param.shape), transposed)
        shapes = (tuple(A.shape), tuple(B.shape))
        assert el.detect(path, g, RANK, shapes, config["peft_version"]) == (LEGACY if g.converts() else el.CURRENT)
        if g.converts():  # and the shapes alone say it too (no expert weight of these models is square)
            assert el.detect(path, g, RANK, shapes, None) == LEGACY
        A_e, B_e = el.to_experts(A, B, g, RANK, el.detect(path, g, RANK, shapes, config["peft_version"]))
        delta = ALPHA / RANK * torch.bmm(B_e, A_e)  # (E, out, in)
        delta = delta.transpose(1, 2) if transposed else delta
        torch.testing.assert_close(delta, outputs[f"delta.{path}"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_lorakit_loads_peft_018_adapter_with_a_note(written, family):
    from _peft_writer import IDS

    import lorakit as lk
    from lorakit.errors import LayoutNote

    outputs = load_file(written / f"{family}.outputs.safetensors")
    base = BUILDERS[family]()
    ids = torch.tensor(IDS)
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, outputs["base"], atol=1e-6, rtol=1e-6)  # the same base
    converts = family != "gpt_oss"  # gpt-oss's experts are transposed: both layouts are one there
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = lk.load_adapters(base, written / family)
    notes = [str(w.message) for w in seen if issubclass(w.category, LayoutNote)]
    if converts:
        assert len(notes) == 1 and "PEFT <= 0.18 layout (peft_version '0.18.1'" in notes[0], notes
    else:
        assert not notes
    assert (outputs["adapted"] - outputs["base"]).abs().max() > 1e-2  # PEFT 0.18's adapter moves the logits
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, outputs["adapted"], atol=1e-5, rtol=1e-5)


def test_inspect_names_the_pre_019_layout(written, capsys):
    from lorakit.cli import main

    assert main(["inspect", str(written / "qwen3_moe")]) == 0
    out = capsys.readouterr().out
    assert "expert layout" in out and "PEFT <= 0.18 (peft_version 0.18.1)" in out
    assert "parameter, 4 experts" in out and '"0.18.1"' in out
