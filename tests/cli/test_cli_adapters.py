"""`lorakit merge` and `generate` with several named adapters (--adapter NAME=DIR, --weight NAME=W)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _cli import in_process  # noqa: E402

transformers = pytest.importorskip("transformers")

import lorakit as lk  # noqa: E402
from lorakit.hf import models as hf  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
IDS = torch.tensor([[2, 4, 5, 6, 7, 8], [2, 9, 10, 11, 12, 3]])


def lorakit(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=180
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    model_dir = _hf_models.save_tiny("llama", root / "llama")
    base, _ = hf.load(model_dir, "causal-lm")
    dirs = {}
    for seed, (name, rank, targets) in enumerate(
        [("math", 4, ["q_proj", "v_proj"]), ("code", 2, ["v_proj", "down_proj"])]
    ):
        model = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=rank, alpha=2 * rank), targets)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        dirs[name] = lk.save_adapters(model, root / name)
    return model_dir, base, dirs


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_merge_a_weighted_combination(setup, tmp_path):
    model_dir, base, dirs = setup
    out = tmp_path / "merged"
    r = lorakit(
        "merge",
        "--model",
        model_dir,
        "--adapter",
        f"math={dirs['math']}",
        "--adapter",
        f"code={dirs['code']}",
        "--weight",
        "math=0.5",
        "--weight",
        "code=-1",
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    assert "combined (cat): max relative error of ΔW" in r.stdout
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    # the reference: each adapter's ΔW added to the base by hand, with its weight
    want = copy.deepcopy(base)
    for name, w in (("math", 0.5), ("code", -1.0)):
        one = lk.load_adapters(copy.deepcopy(base), dirs[name])
        with torch.no_grad():
            for module, layer in lk.lora_layers(one).items():
                want.get_submodule(module).weight.add_(w * layer.weight_delta())
    torch.testing.assert_close(_logits(merged), _logits(want), rtol=1e-4, atol=1e-5)


def test_merge_refuses_unknown_weight_names(setup, tmp_path, capsys):
    """In process (`in_process`): refused before a model loads; merge's real process is in the tests around."""
    model_dir, _, dirs = setup
    status, _, err = in_process(
        capsys,
        "merge",
        "--model",
        model_dir,
        "--adapter",
        f"math={dirs['math']}",
        "--weight",
        "nope=1",
        "--out",
        tmp_path / "o",
    )
    assert status == 2 and "--weight names ['nope'] match no --adapter" in err
    status, _, err = in_process(
        capsys, "merge", "--model", model_dir, "--adapter", f"half={dirs['math']}", "--out", tmp_path / "o"
    )
    assert status == 2 and "reserved" in err
    assert not (tmp_path / "o").exists()


def test_generate_one_completion_per_adapter(setup, capsys):
    """The first `generate` is the real process; the combined one is the same entry point in process
    (`in_process`): what it adds is its output, and another process start would only load the same model again."""
    model_dir, _, dirs = setup
    r = lorakit(
        "generate",
        "--model",
        model_dir,
        "--adapter",
        f"math={dirs['math']}",
        "--adapter",
        f"code={dirs['code']}",
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "4",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--- adapter math ---") == 1 and r.stdout.count("--- adapter code ---") == 1
    status, out, err = in_process(
        capsys,
        "generate",
        "--model",
        model_dir,
        "--adapter",
        f"math={dirs['math']}",
        "--adapter",
        f"code={dirs['code']}",
        "--weight",
        "math=1",
        "--weight",
        "code=1",
        "--combine",
        "svd",
        "--combine-rank",
        "2",
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "4",
    )
    assert status == 0, err
    assert "--- combined (svd, max relative error of ΔW" in out


def test_merge_shows_progress_piped_and_overwrite_swaps_in_only_a_whole_model(setup, tmp_path, capsys):
    model_dir, base, dirs = setup
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("the model merged last week")
    status, _, err = in_process(capsys, "merge", "--model", model_dir, "--adapter", dirs["math"], "--out", out)
    assert status == 2 and "pass --overwrite to replace it, or choose a new --out" in err  # refused before loading

    blowup = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=2), ["q_proj"])  # its ΔW overflows fp32
    with torch.no_grad():
        for n, p in blowup.named_parameters():
            if "lora_" in n:
                p.fill_(1e30)
    bad = lk.save_adapters(blowup, tmp_path / "blowup")
    r = lorakit("merge", "--model", model_dir, "--adapter", bad, "--out", out, "--overwrite")
    assert r.returncode == 1 and "non-finite" in r.stderr, r.stderr
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # the failed merge left OUT as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blowup", "merged"]  # and nothing beside it

    r = lorakit("merge", "--model", model_dir, "--adapter", dirs["math"], "--out", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("merged 4 LoRA modules of") and str(out) in r.stdout
    for step in (
        f"loading the model {model_dir}",
        f"loading the adapter {dirs['math']}",
        "merging 4 LoRA modules into the base",
        "writing ",
    ):
        assert step in r.stderr, (step, r.stderr)
    lines = [line for line in r.stderr.splitlines() if " in " in line and line.endswith(" s")]
    assert len(lines) == 4, r.stderr  # each step says when it is done, and how long it took
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blowup", "merged"]
