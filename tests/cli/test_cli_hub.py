"""Every command that takes --model takes a hub id too (ORG/NAME, --revision), through an on-disk hub cache offline.

In-process (`lorakit.cli.main`): finetune, eval and generate on a cached hub id; the adapter records the id and
commit as PEFT does (and PEFT loads it onto the base those name); --revision picks the second snapshot; a model that
is not cached is exit 2 naming the id, the revision and the cache, for every command; every --model flag is the
shared one (cli.common.add_model_flags).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from _cli import IDS, MASK, _causal_rows, _write_jsonl  # noqa: E402
from _hub_cache import ABSENT, BRANCH, MAIN, REPO, V2  # noqa: E402

from lorakit.cli import build_parser, main, runfile  # noqa: E402
from lorakit.cli.common import MODEL_METAVAR  # noqa: E402
from lorakit.hf import models as hf  # noqa: E402

PROMPT = "question : what is two plus two ? answer :"


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("rows") / "train.jsonl", _causal_rows())


@pytest.fixture(scope="module")
def adapter(hub_cache, rows, tmp_path_factory) -> Path:
    """An adapter fine-tuned on the hub id (offline, from the cache), in process."""
    out = tmp_path_factory.mktemp("runs") / "a1"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in hub_cache.env().items():
            mp.setenv(key, value)
        argv = ["finetune", "--model", REPO, "--data", rows, "--task", "causal-lm", "--out", out]
        assert main([str(a) for a in [*argv, "--max-steps", "2", "--batch-size", "4", "--plain"]]) == 0
    return out


def test_finetune_on_a_hub_id_records_the_id_and_commit_as_peft_does(adapter, hub_env):
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == REPO and config["revision"] == MAIN  # not the cache path
    task = json.loads((adapter / hf.TASK_FILE).read_text())
    assert task["base_model"] == REPO and task["base_revision"] == MAIN
    recorded = runfile.read(adapter / "run" / "run.toml", _subparser("finetune"))
    assert recorded["model"] == REPO  # a hub id stays one in the run file (a local path is made absolute)
    # PEFT, the oracle: the base named by the recorded id and revision, from the same cache, plus the adapter
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(
        config["base_model_name_or_path"], revision=config["revision"], cache_dir=hub_env.cache, local_files_only=True
    )
    theirs = PeftModel.from_pretrained(base, adapter).eval()
    ours, _, _ = hf.load_with_adapter(hub_env.snapshot(MAIN), adapter)
    with torch.no_grad():
        want = theirs(input_ids=IDS, attention_mask=MASK).logits
        got = ours.eval()(input_ids=IDS, attention_mask=MASK).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_eval_and_generate_by_hub_id_equal_the_snapshot_directory(adapter, hub_env, rows, capsys):
    outputs = {}
    for model in (REPO, hub_env.snapshot(MAIN)):
        assert main(["eval", "--model", str(model), "--adapter", str(adapter), "--data", str(rows), "--json"]) == 0
        scored = json.loads(capsys.readouterr().out)
        argv = [
            "generate",
            "--model",
            str(model),
            "--adapter",
            str(adapter),
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "4",
        ]
        assert main(argv) == 0
        outputs[str(model)] = (scored, capsys.readouterr().out)
    (by_id, text), (by_dir, text_dir) = outputs.values()
    assert by_id["base"] == by_dir["base"] and text == text_dir and PROMPT in text


def test_revision_picks_the_second_snapshot(hub_env, rows, capsys):
    losses = []
    for argv in (["--model", REPO], ["--model", REPO, "--revision", BRANCH], ["--model", str(hub_env.snapshot(V2))]):
        assert main(["eval", *argv, "--data", str(rows), "--json"]) == 0
        losses.append(json.loads(capsys.readouterr().out)["base"]["loss"])
    main_loss, by_branch, by_dir = losses
    assert by_branch == by_dir != main_loss


def _commands(adapter: Path, rows: Path, tmp: Path) -> dict[str, list[str]]:
    """Each command that takes a model, with the rest of its arguments valid."""
    return {
        "finetune": ["--data", str(rows), "--task", "causal-lm", "--out", str(tmp / "ft")],
        "eval": ["--data", str(rows)],
        "predict": ["--input", str(rows)],
        "generate": ["--prompt", PROMPT],
        "merge": ["--adapter", str(adapter), "--out", str(tmp / "merged")],
        "serve": [],
        "export": ["--adapter", str(adapter), "--format", "onnx", "--out", str(tmp / "onnx")],
        "inspect": [str(adapter)],
    }


@pytest.mark.parametrize("command", ["finetune", "eval", "predict", "generate", "merge", "serve", "export", "inspect"])
def test_a_model_not_in_the_cache_is_exit_2_naming_id_revision_and_cache(
    command, adapter, rows, hub_env, tmp_path, capsys
):
    rest = _commands(adapter, rows, tmp_path)[command]
    argv = (
        [command, *rest[:1], "--model", ABSENT, *rest[1:]]
        if command == "inspect"
        else [command, "--model", ABSENT, *rest]
    )
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"lorakit {command}: error: {ABSENT}: no such local directory" in err
    assert "(revision main)" in err and str(hub_env.cache) in err and "download it once online" in err
    assert main([*argv, "--revision", "v9"]) == 2 and "(revision v9)" in capsys.readouterr().err


def test_every_model_flag_is_the_shared_one():
    """A command declares --model through common.add_model_flags, so it takes a hub id and --revision too."""
    declared = {}
    for name, sub in _subparsers().items():
        flags = {a.dest: a for a in sub._actions if a.option_strings}
        if "model" in flags:
            declared[name] = (flags["model"].metavar, "revision" in flags)
    assert set(declared) >= {"finetune", "eval", "predict", "generate", "merge", "serve", "export", "inspect"}
    assert all(v == (MODEL_METAVAR, True) for v in declared.values()), declared


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _subparser(name: str) -> argparse.ArgumentParser:
    return _subparsers()[name]
