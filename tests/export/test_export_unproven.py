"""`lorakit export --no-proof`: the file written where the proof's runtime is missing, said loudly to be unproven;
without --no-proof, a missing runtime is refused naming both remedies, before anything is written.

The runtimes are made unimportable for real in a child Python (_without_runtimes.py); the written GGUF files are
read back with the gguf package's reader and must be byte for byte what the writers a proven export runs write.
The proof.json of proven exports is walked for empty fields where those exports are made (test_onnx.py,
test_gguf_export.py). An ONNX export without onnxruntime is refused here; writing one unproven is not run (torch's
exporter alone costs ~20 s of CPU; the graph it writes is the proven path's, onnx._write_graph).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.export.gguf_adapter import write_gguf_adapter
from lorakit.export.gguf_model import write_gguf_model
from lorakit.hf import models as hf

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _proof_fields import assert_proof_fields  # noqa: E402
from test_gguf_model import save_bpe_llama  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses and export runtimes: not in the fast set


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(base dir, adapter dir): a tiny byte-level-BPE Llama and an adapter whose B matrices are not zero."""
    root = tmp_path_factory.mktemp("unproven")
    base_dir = save_bpe_llama(root / "base")
    model, _ = hf.load(base_dir, "causal-lm")
    lk.apply_lora(model, lk.LoraConfig(rank=4, alpha=8), ["q_proj", "v_proj", "down_proj"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    adapter = lk.save_adapters(model, root / "adapter")
    hf.write_task_file(adapter, "causal-lm")
    return base_dir, adapter


def _export_args(llama, fmt, out, *extra):
    base, adapter = llama
    return [
        "export",
        "--model",
        str(base),
        "--adapter",
        str(adapter),
        "--format",
        fmt,
        "--dtype",
        "f32",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def without_runtimes(llama, tmp_path_factory):
    """(root, {name: (exit code, stdout, stderr)}): three exports in one child Python without llama_cpp and
    onnxruntime. gguf-refused goes to an existing empty directory, onnx-refused to a new path."""
    root = tmp_path_factory.mktemp("no-runtime")
    (root / "gguf-refused").mkdir()
    runs = {
        "gguf-refused": _export_args(llama, "gguf-adapter", root / "gguf-refused"),
        "gguf": _export_args(llama, "gguf-adapter", root / "gguf", "--no-proof"),
        "onnx-refused": _export_args(llama, "onnx", root / "onnx-refused"),
    }
    r = subprocess.run(
        [sys.executable, str(HERE / "_without_runtimes.py"), *map(json.dumps, runs.values())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    stdout = r.stdout.split("=== ")[1:]  # per command: "N\n<its stdout>", then "exit CODE\n"
    stderr = r.stderr.split("=== ")[1:]  # per command: "N\n<its stderr>"
    results = {}
    for i, name in enumerate(runs):
        code = int(stdout[2 * i + 1].split()[1])
        results[name] = code, stdout[2 * i].partition("\n")[2], stderr[i].partition("\n")[2]
    return root, results


def test_a_missing_llama_cpp_is_refused_naming_both_remedies_and_nothing_is_written(without_runtimes):
    root, results = without_runtimes
    code, _, err = results["gguf-refused"]
    assert code == 2
    assert "llama-cpp-python" in err and "pip install 'lorakit[export]'" in err and "bash scripts/setup.sh dev" in err
    assert "--no-proof" in err
    assert list((root / "gguf-refused").iterdir()) == []  # the empty OUT it was given, left as it was


def test_a_missing_onnxruntime_is_refused_naming_both_remedies(without_runtimes):
    root, results = without_runtimes
    code, _, err = results["onnx-refused"]
    assert code == 2 and "onnxruntime" in err and "pip install 'lorakit[export]'" in err and "--no-proof" in err
    assert not (root / "onnx-refused").exists()


def test_no_proof_writes_the_gguf_files_a_proven_export_writes(without_runtimes, llama, tmp_path):
    root, results = without_runtimes
    code, out, err = results["gguf"]
    assert code == 0, out + err
    assert "NOT PROVEN" in err and "NOT PROVEN" in out.splitlines()[-1]
    written = root / "gguf"
    assert sorted(p.name for p in written.iterdir()) == ["adapter.gguf", "model.gguf", "proof.json"]
    proof = assert_proof_fields(written)
    assert proof["passed"] is None and "llama-cpp-python" in proof["reason"]
    assert proof["artefacts"] == ["model.gguf", "adapter.gguf"] and proof["dtype"] == "f32"
    adapter = gguf.GGUFReader(written / "adapter.gguf")
    assert adapter.fields["general.type"].contents() == "adapter"
    assert any(t.name.endswith("attn_q.weight.lora_a") for t in adapter.tensors)
    base, adapter_dir = llama  # what a proven export writes and runs in llama.cpp (gguf.export_gguf), byte for byte
    write_gguf_model(base, tmp_path / "model.gguf", dtype="f32")
    write_gguf_adapter(adapter_dir, base, tmp_path / "adapter.gguf", dtype="f32")
    for name in ("model.gguf", "adapter.gguf"):
        assert (written / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_no_proof_with_the_runtime_installed_says_it_was_asked_for(llama, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_export_args(llama, "gguf", out, "--no-proof")) == 0
    printed = capsys.readouterr()
    assert "NOT PROVEN" in printed.err and printed.out.strip().splitlines()[-1].endswith(
        f"NOT PROVEN (why: {out / 'proof.json'})"
    )
    proof = assert_proof_fields(out)
    assert proof["passed"] is None and proof["reason"] == "--no-proof: the file was not run in llama.cpp"
    assert sorted(p.name for p in out.iterdir()) == ["model.gguf", "proof.json"]
    assert gguf.GGUFReader(out / "model.gguf").fields["general.architecture"].contents() == "llama"
