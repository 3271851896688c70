"""The `lorakit` command in real subprocesses: finetune, merge, inspect, generate; exit codes 0 / 1 / 2.

Interop is checked against the ecosystem itself: PEFT loads what `lorakit finetune` writes, transformers
loads what `lorakit merge` writes, and PEFT-made adapters go through merge/inspect/generate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _cli import _causal_rows, _logits, _write_jsonl, in_process, lorakit  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lorakit.hf import data  # noqa: E402
from lorakit.hf import models as hf  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"gpt2": _hf_models.save_tiny("gpt2", root / "gpt2")}  # the llama's run is `causal_run` (conftest.py)


# -- help and usage errors -------------------------------------------------------------------------


def test_help_and_usage_errors_exit_2(tmp_path, tiny, capsys):
    """In process (`in_process`): each ends before a model loads; the real process's exit codes 0/1/2 are the
    subprocess runs below (`--skip-bad-rows`, `--lr 1e30`, the bad rows)."""
    status, out, _ = in_process(capsys, "finetune", "--help")
    assert status == 0 and "usage: lorakit finetune" in out and '{"prompt": ..., "completion": ...}' in out
    status, _, err = in_process(capsys, "merge", "--model", tiny["gpt2"])
    assert status == 2 and "required: --adapter, --out" in err
    status, _, err = in_process(
        capsys, "finetune", "--model", tmp_path, "--data", "x.jsonl", "--task", "causal-lm", "--out", tmp_path / "o"
    )
    assert status == 2 and "not a Hugging Face model directory (no config.json)" in err
    assert "Traceback" not in err


def test_bad_data_refuses_to_start_with_file_and_line(tmp_path, tiny):
    bad = _write_jsonl(tmp_path / "bad.jsonl", _causal_rows()[:6] + [{"text": ""}, "{oops", {"prompt": "q"}])
    base = ["finetune", "--model", tiny["gpt2"], "--task", "causal-lm", "--epochs", "1", "--plain"]
    r = lorakit(*base, "--data", bad, "--out", tmp_path / "o1")
    assert r.returncode == 2, r.stderr
    assert "3 bad row(s)" in r.stderr and "--skip-bad-rows" in r.stderr
    for line, why in ((7, "field 'text' is empty"), (8, "not valid JSON"), (9, "missing field 'completion'")):
        assert f"{bad}:{line}: {why}" in r.stderr
    assert not (tmp_path / "o1").exists()  # refused before anything was written

    r = lorakit(*base, "--data", bad, "--out", tmp_path / "o4", "--skip-bad-rows")
    assert r.returncode == 0, r.stderr
    assert "skipping 3 bad row(s)" in r.stderr
    report = json.loads((tmp_path / "o4" / "run" / "finetune_report.json").read_text())
    assert len(report["skipped_bad_rows"]) == 3 and report["skipped_bad_rows"][0].startswith(f"{bad}:7:")


def test_runtime_failure_exits_1(tmp_path, tiny):
    rows = _write_jsonl(tmp_path / "t.jsonl", _causal_rows())
    r = lorakit(
        "finetune",
        "--model",
        tiny["gpt2"],
        "--data",
        rows,
        "--task",
        "causal-lm",
        "--out",
        tmp_path / "o",
        "--lr",
        "1e30",
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--plain",
    )
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "lorakit finetune: failed: FloatingPointError" in r.stderr and "Traceback" not in r.stderr


# -- finetune -> PEFT, merge -> transformers, generate ---------------------------------------------------


def test_finetune_causal_lm_then_peft_merge_generate_inspect(tmp_path, causal_run, capsys):
    """`causal_run` (tests/cli/conftest.py) is the real `lorakit finetune`, shared with test_cli_eval.py."""
    out, model, stdout = causal_run["adapter"], causal_run["model"], causal_run["stdout"]
    assert "before valid_loss=" in stdout and "after  valid_loss=" in stdout and "valid_perplexity=" in stdout
    assert {p.name for p in out.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorakit_task.json",
        "run",
    }
    assert {p.name for p in (out / "run").iterdir()} >= {"metrics.jsonl", "loss.png", "checkpoint.safetensors"}
    report = json.loads((out / "run" / "finetune_report.json").read_text())
    assert report["after"]["loss"] < report["before"]["loss"]

    # PEFT loads the adapter and computes the same logits as lorakit
    ours, _, _ = hf.load_with_adapter(model, out)
    want = _logits(ours)
    theirs = peft.PeftModel.from_pretrained(hf.load_model(model, "causal-lm"), out)
    diff = (_logits(theirs) - want).abs().max().item()
    print(f"\nPEFT parity (causal-lm, finetune adapter): max |Δlogits| = {diff:.3g}")
    assert diff < 1e-5

    # merge writes a directory transformers loads, equal to base + adapter
    r = lorakit("merge", "--model", model, "--adapter", out, "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    diff = (_logits(merged) - want).abs().max().item()
    print(f"merged vs base+adapter (causal-lm): max |Δlogits| = {diff:.3g}")
    assert diff < 1e-4

    r = lorakit(
        "generate",
        "--model",
        model,
        "--adapter",
        out,
        "--prompt",
        "question : what is two plus two ? answer :",
        "--max-new-tokens",
        "3",
        "--compare",
    )
    assert r.returncode == 0, r.stderr
    assert "--- base ---" in r.stdout and "--- base + adapter ---" in r.stdout
    assert r.stdout.strip().splitlines()[-1].split()[0] == "four"  # what the adapter learned (no prompt echo)

    from lorakit.cli import main  # in-process, to keep the suite quick: same entry point, same output

    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ranks"] == [4] and len(info["modules"]) == 14 and info["config"]["task_type"] == "CAUSAL_LM"


def test_resume_and_existing_out(tmp_path, tiny, capsys):
    rows = _write_jsonl(tmp_path / "t.jsonl", _causal_rows())
    args = [
        "finetune",
        "--model",
        tiny["gpt2"],
        "--data",
        rows,
        "--task",
        "causal-lm",
        "--out",
        tmp_path / "o",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--plain",
    ]
    assert lorakit(*args).returncode == 0
    first = (tmp_path / "o" / "adapter_model.safetensors").read_bytes()
    from lorakit.cli import main

    assert main([str(a) for a in args]) == 2  # in-process: refused before any model is loaded
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err
    status, _, err = in_process(capsys, *args, "--resume")  # the real process's exit 0 is the first run's
    assert status == 0, err
    assert (tmp_path / "o" / "adapter_model.safetensors").read_bytes() == first  # a finished run stays as it was


# -- a PEFT-made adapter through lorakit's commands ---------------------------------------------------------


def test_peft_trained_adapter_through_merge_inspect_generate(tmp_path, tiny):
    base, tok = hf.load(tiny["gpt2"], "causal-lm")
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM"
        ),
    )
    batch = data.collate(
        [{"input_ids": tok(s)["input_ids"], "labels": tok(s)["input_ids"]} for s in _hf_models.SENTENCES],
        tok.pad_token_id,
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):  # PEFT trains it
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    want = _logits(model)
    model.save_pretrained(tmp_path / "peft")

    r = lorakit("inspect", tmp_path / "peft")
    assert r.returncode == 0, r.stderr
    assert "transformer.h.0.attn.c_attn" in r.stdout and "4 LoRA modules, ranks [4]" in r.stdout
    assert "base weight" in r.stdout and "32×96" in r.stdout  # the Conv1D base it expects, (d_in, d_out)

    r = lorakit("merge", "--model", tiny["gpt2"], "--adapter", tmp_path / "peft", "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    diff = (_logits(merged) - want).abs().max().item()
    print(f"\nPEFT-trained adapter, lorakit merge vs PEFT: max |Δlogits| = {diff:.3g}")
    assert diff < 1e-4

    r = lorakit(
        "generate",
        "--model",
        tiny["gpt2"],
        "--adapter",
        tmp_path / "peft",
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "1",
        "--echo",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the cat")  # --echo: the prompt, then its completion


def test_more_exit_codes_in_process(tmp_path, tiny, capsys):
    """The same entry point called in-process: cheap checks of the remaining input errors (exit 2)."""
    import lorakit as lk
    from lorakit.cli import main

    model = hf.load_model(tiny["gpt2"], "seq-cls", id2label={0: "a", 1: "b"})
    lk.apply_lora(model, lk.LoraConfig(rank=2), "all-linear", modules_to_save=hf.head_names(model))
    adapter = lk.save_adapters(model, tmp_path / "cls")
    hf.write_task_file(adapter, "seq-cls", id2label={0: "a", 1: "b"})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    rows = _write_jsonl(tmp_path / "t.jsonl", _causal_rows())
    remote = tmp_path / "remote"  # a model that ships its own code
    remote.mkdir()
    for f in tiny["gpt2"].iterdir():
        (remote / f.name).write_bytes(f.read_bytes())
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "evil.Model"}}))
    cases = [
        (
            ["finetune", "--model", remote, "--data", rows, "--task", "causal-lm", "--out", tmp_path / "r"],
            "needs its own Python code (config.json has auto_map); lorakit runs it only with --trust-remote-code",
        ),
        (["generate", "--model", tiny["gpt2"], "--adapter", adapter, "--prompt", "hi"], "is a seq-cls adapter"),
        (
            ["merge", "--model", tiny["gpt2"], "--adapter", adapter, "--out", tmp_path / "full"],
            "exists and is not an empty directory; pass --overwrite to replace it, or choose a new --out",
        ),
        (
            ["merge", "--model", tiny["gpt2"], "--adapter", tmp_path, "--out", tmp_path / "m"],
            "adapter_config.json: no such file",
        ),
        (["inspect", tmp_path / "nothing"], "no such file or directory"),
        (
            [
                "finetune",
                "--model",
                tiny["gpt2"],
                "--data",
                rows,
                "--task",
                "causal-lm",
                "--out",
                tmp_path / "r",
                "--resume",
            ],
            "no run to resume there",
        ),
        (
            [
                "finetune",
                "--model",
                tiny["gpt2"],
                "--data",
                rows,
                "--task",
                "causal-lm",
                "--out",
                tmp_path / "r",
                "--targets",
                "nope",
            ],
            "target 'nope' matches no module",
        ),
        (
            [
                "finetune",
                "--model",
                tiny["gpt2"],
                "--data",
                rows,
                "--task",
                "causal-lm",
                "--out",
                tmp_path / "r",
                "--rank",
                "0",
            ],
            "rank=0 is invalid",
        ),
    ]
    for argv, message in cases:
        assert main([str(a) for a in argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
