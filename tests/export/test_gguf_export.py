"""`lorakit export --format gguf | gguf-adapter`, proven in llama.cpp itself (llama-cpp-python, installed by CI).

The proofs are lorakit's own; these tests check that they run (not skipped: llama_cpp is imported here, so a
missing runtime fails), that they are tight where they must be (f32 within 1e-5, not just the stated 1e-4), that
the adapter's effect is large beside them (so agreement is not the base agreeing with itself), and that they fail
when the file computes something else.
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import llama_cpp  # noqa: F401  (the export extra: CI installs it; a missing runtime fails here, never skips)
import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.cli import main
from lorakit.export import gguf, prepare
from lorakit.export.gguf_vocab import TOKENIZER_CHECK

sys.path.insert(0, str(Path(__file__).parent))
from _proof_fields import assert_proof_fields  # noqa: E402
from test_gguf_model import save_bpe_llama  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

ENV_PY = [sys.executable, "-m", "lorakit", "export"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head"]


def _randomised(model, seed=7, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def _adapter(base_dir, out, config, targets=TARGETS, seed=7):
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    lk.save_adapters(_randomised(lk.apply_lora(base, config, targets), seed), out)
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(base dir, adapter dir): a tiny byte-level-BPE Llama and an rsLoRA adapter with per-module alpha and rank,
    on attention, MLP, the embeddings and the (untied) head: everything llama.cpp's one global alpha gets wrong."""
    root = tmp_path_factory.mktemp("gguf-export")
    base_dir = save_bpe_llama(root / "base")
    config = lk.LoraConfig(
        rank=4, alpha=8, use_rslora=True, rank_pattern={"layers.1.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 3}
    )
    return base_dir, _adapter(base_dir, root / "adapter", config)


def _proofs(out):
    return json.loads((out / "proof.json").read_text())


def test_gguf_adapter_cli_proves_base_and_base_plus_adapter_in_llama_cpp(llama, tmp_path):
    base_dir, adapter = llama
    out = tmp_path / "out"
    r = subprocess.run(
        [
            *ENV_PY,
            "--model",
            base_dir,
            "--adapter",
            adapter,
            "--format",
            "gguf-adapter",
            "--dtype",
            "f32",
            "--out",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["adapter.gguf", "model.gguf", "proof.json"]
    proofs = _proofs(out)
    assert proofs["passed"] and [p["what"] for p in proofs["proofs"]] == ["base", "model.gguf + adapter.gguf"]
    assert_proof_fields(out)  # every field says something (the base's adapter checks, not made, are left out)
    for p in proofs["proofs"]:
        assert p["max_abs_diff"] < 1e-5 and p["tolerance"] == 1e-4  # measured ~6e-7
        # 8 greedy tokens after each of the 4 proof texts and the special-token text (<pad><s></s>)
        assert p["argmax_agree"] == p["positions"] and p["greedy_agree"] == p["greedy_tokens"] == 40
        assert p["tokenizer_agrees"] is True and p["tokenizer_texts"] == 5 + len(TOKENIZER_CHECK)
        assert p["runtime"].startswith("llama.cpp (llama-cpp-python")
    assert (
        r.stdout.strip().splitlines()[-1]
        == f"exported causal-lm model to {out / 'adapter.gguf'} (f32); proof in {out / 'proof.json'}"
    )


def test_the_adapter_changes_the_logits_far_beyond_the_tolerance(llama):
    """Agreement would mean nothing if the adapter did nothing: its effect on the proof inputs is >> 1e-4."""
    base_dir, adapter = llama
    model, tok, _ = prepare.load_unmerged(base_dir, [adapter])
    ids = torch.tensor([tok(prepare.PROOF_TEXTS[0])["input_ids"]])
    with torch.no_grad():
        adapted = model(ids).logits
        with lk.disable_adapters(model):
            bare = model(ids).logits
    assert (adapted - bare).abs().max() > 0.1


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_merged_gguf_is_proven_for_each_dtype(llama, tmp_path, dtype):
    base_dir, adapter = llama
    model, tok, task = prepare.load_unmerged(base_dir, [adapter])
    done = gguf.export_gguf(model, tok, task, base_dir, [adapter], tmp_path / "out", dtype=dtype)
    (proof,) = done.proofs
    assert proof.passed and proof.what == "merged" and proof.dtype == dtype
    assert proof.tokenizer_agrees
    if dtype == "f32":
        assert proof.max_abs_diff < 1e-5 and proof.argmax_agree == proof.positions
        assert proof.greedy_agree == proof.greedy_tokens
    else:  # lossy, yet well inside the bound (measured a tenth of it or less for f16, under a seventh for q8_0);
        # a greedy token may part from lorakit's at a near-tie (the proof checks that), as another CPU's may
        assert 1e-6 < proof.max_abs_diff < proof.tolerance / 2
    assert done.artefact == tmp_path / "out" / "model.gguf"


def test_dora_is_merged_into_a_gguf_model_but_refused_as_a_gguf_adapter(tmp_path):
    base_dir = save_bpe_llama(tmp_path / "base")
    adapter = _adapter(base_dir, tmp_path / "dora", lk.LoraConfig(rank=4, alpha=8, use_dora=True), ["q_proj", "v_proj"])
    model, tok, task = prepare.load_unmerged(base_dir, [adapter])
    done = gguf.export_gguf(model, tok, task, base_dir, [adapter], tmp_path / "merged", dtype="f32")
    assert done.proof.passed and done.proof.max_abs_diff < 1e-5
    r = subprocess.run(
        [*ENV_PY, "--model", base_dir, "--adapter", adapter, "--format", "gguf-adapter", "--out", tmp_path / "out"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert "use_dora=true" in r.stderr and "--format gguf" in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_file_that_computes_something_else_fails_the_proof_and_leaves_nothing(llama, tmp_path):
    """The reference is the adapter loaded in the model; the GGUF is written from another adapter's directory:
    llama.cpp then computes something else, the proof says so, and nothing is left at out or beside it."""
    base_dir, adapter = llama
    other = _adapter(
        base_dir,
        tmp_path / "other",
        lk.LoraConfig(
            rank=4, alpha=8, use_rslora=True, rank_pattern={"layers.1.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 3}
        ),
        seed=8,
    )
    model, tok, task = prepare.load_unmerged(base_dir, [adapter])
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(prepare.ProofFailed, match="FAILED") as e:
        gguf.export_gguf(model, tok, task, base_dir, [other], tmp_path / "out", dtype="f32", adapter_only=True)
    assert e.value.proof.what == "model.gguf + adapter.gguf" and e.value.proof.max_abs_diff > 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bad_input_exits_2_before_loading_and_writes_nothing(llama, tmp_path, capsys):
    base_dir, adapter = llama
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import _hf_models

    gpt2 = _hf_models.save_tiny("gpt2", tmp_path / "gpt2")
    gpt2_adapter = _adapter(gpt2, tmp_path / "gpt2-adapter", lk.LoraConfig(rank=2), ["c_attn"])
    tied = save_bpe_llama(tmp_path / "tied", tie=True)
    head = _adapter(tied, tmp_path / "head", lk.LoraConfig(rank=2), ["lm_head"])
    other = copy.deepcopy(json.loads((base_dir / "config.json").read_text()))
    other["hidden_size"], other["intermediate_size"] = 64, 128
    bigger = tmp_path / "bigger"
    bigger.mkdir()
    for f in base_dir.iterdir():
        (bigger / f.name).write_bytes(f.read_bytes())
    (bigger / "config.json").write_text(json.dumps(other))
    out = tmp_path / "out"
    cases = [
        (["--model", gpt2, "--adapter", gpt2_adapter, "--format", "gguf"], "GGUF export (model and adapter) supports"),
        (["--model", gpt2, "--adapter", adapter, "--format", "gguf"], "saved for a LlamaForCausalLM base"),
        (
            ["--model", base_dir, "--adapter", adapter, "--adapter", adapter, "--format", "gguf-adapter"],
            "writes one adapter, got 2",
        ),
        (["--model", tied, "--adapter", head, "--format", "gguf-adapter"], "ties lm_head to the embeddings"),
        (["--model", bigger, "--adapter", adapter, "--format", "gguf-adapter"], "the adapter is for another model"),
        (["--model", base_dir, "--adapter", adapter, "--format", "gguf", "--dtype", "q4_k"], "invalid choice"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) if "q4_k" in args else _no_raise():
            assert main(["export", *map(str, args), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_an_adapter_saved_for_another_base_is_refused_unless_allowed(llama, tmp_path):
    """Same shapes, different weights (another fine-tune of the base): exit 2 naming the mismatch; allowed, the
    export runs and is proven against lorakit on the base it was given."""
    base_dir, adapter = llama
    other = tmp_path / "other-base"
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(1.01)
    model.save_pretrained(other)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (other / f).write_bytes((base_dir / f).read_bytes())
    args = [*ENV_PY, "--model", other, "--adapter", adapter, "--format", "gguf", "--dtype", "f32", "--out"]
    r = subprocess.run([*args, tmp_path / "refused"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "q_proj" in r.stderr and "--allow-base-mismatch" in r.stderr, r.stderr
    assert not (tmp_path / "refused").exists()
    r = subprocess.run(
        [*args, tmp_path / "allowed", "--allow-base-mismatch"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert _proofs(tmp_path / "allowed")["passed"]


def test_a_gguf_adapter_export_refuses_an_adapter_file_changed_since_it_was_saved(llama, tmp_path):
    base_dir, adapter = llama
    changed = tmp_path / "changed"
    changed.mkdir()
    for f in adapter.iterdir():
        (changed / f.name).write_bytes(f.read_bytes())
    weights = changed / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's data: still a well-formed file
    weights.write_bytes(bytes(data))
    r = subprocess.run(
        [*ENV_PY, "--model", base_dir, "--adapter", changed, "--format", "gguf-adapter", "--out", tmp_path / "out"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "changed since it was saved" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
