"""Every command that takes --model takes a hub id too (ORG/NAME, --revision), through an on-disk hub cache offline.

In process (`lorakit.cli.main`): an adapter of a hub base records the id and commit as PEFT does (and PEFT loads it
onto the base those name); the run file keeps a hub id; --revision picks the second snapshot; a model that is not
cached is exit 2 naming the id, the revision and the cache, for every command; every --model flag is the shared one
(cli.common.add_model_flags). Slow: `finetune`, `eval` and `generate` on a hub id, equal to the same on its directory.
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
from lorakit.hf import hub  # noqa: E402
from lorakit.hf import models as hf  # noqa: E402

PROMPT = "question : what is two plus two ? answer :"


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("rows") / "train.jsonl", _causal_rows())


@pytest.fixture(scope="module")
def adapter(hub_cache, tmp_path_factory) -> Path:
    """A LoRA adapter saved from the base the hub id names (library calls, as finetune makes one), untrained."""
    import lorakit as lk

    out = tmp_path_factory.mktemp("adapters") / "a0"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in hub_cache.env().items():
            mp.setenv(key, value)
        base = hub.resolve_model(REPO)
    model, _ = hf.load(base, "causal-lm")
    lk.apply_lora(model, lk.LoraConfig(rank=2, alpha=4.0), targets=["q_proj", "v_proj"])
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero, so the adapter changes the logits
            torch.nn.init.normal_(p, std=0.5)
    lk.save_adapters(model, out)
    hf.write_task_file(out, "causal-lm", base_model=base)
    return out


@pytest.fixture(scope="module")
def trained(hub_cache, rows, tmp_path_factory) -> Path:
    """An adapter fine-tuned by `lorakit finetune --model ORG/NAME` (offline, from the cache), in process."""
    out = tmp_path_factory.mktemp("runs") / "a1"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in hub_cache.env().items():
            mp.setenv(key, value)
        argv = ["finetune", "--model", REPO, "--data", rows, "--task", "causal-lm", "--out", out]
        assert main([str(a) for a in [*argv, "--max-steps", "2", "--batch-size", "4", "--plain"]]) == 0
    return out


def test_an_adapter_of_a_hub_base_records_the_id_and_commit_as_peft_does(adapter, hub_env):
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == REPO and config["revision"] == MAIN  # not the cache path
    task = json.loads((adapter / hf.TASK_FILE).read_text())
    assert task["base_model"] == REPO and task["base_revision"] == MAIN
    # PEFT, the oracle: the base named by the recorded id and revision, from the same cache, plus the adapter
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(
        config["base_model_name_or_path"], revision=config["revision"], cache_dir=hub_env.cache, local_files_only=True
    )
    with torch.no_grad():
        plain = base.eval()(input_ids=IDS, attention_mask=MASK).logits
    theirs = PeftModel.from_pretrained(base, adapter).eval()
    ours, _, _ = hf.load_with_adapter(hub.resolve_model(REPO), adapter)
    with torch.no_grad():
        want = theirs(input_ids=IDS, attention_mask=MASK).logits
        got = ours.eval()(input_ids=IDS, attention_mask=MASK).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)


def test_the_run_file_keeps_a_hub_id_and_makes_a_local_model_absolute(hub_env, tmp_path, monkeypatch):
    parser = _subparser("finetune")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    for model, recorded in ((REPO, REPO), ("local", str(tmp_path / "local"))):
        args = parser.parse_args(["--model", model, "--data", "d.jsonl", "--task", "causal-lm", "--out", "o"])
        assert runfile.resolved(args, parser)["model"] == recorded


@pytest.mark.slow  # a whole finetune in process
def test_finetune_eval_generate_on_a_hub_id(trained, hub_env, rows, capsys):
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == REPO and config["revision"] == MAIN
    recorded = runfile.read(trained / "run" / "run.toml", _subparser("finetune"))
    assert recorded["model"] == REPO  # `--config OUT/run/run.toml` repeats the run on the hub id
    outputs = []
    for model in (REPO, hub_env.snapshot(MAIN)):  # by id, and by the directory it names: the same answers
        assert main(["eval", "--model", str(model), "--adapter", str(trained), "--data", str(rows), "--json"]) == 0
        scored = json.loads(capsys.readouterr().out)
        argv = ["generate", "--model", str(model), "--adapter", str(trained), "--prompt", PROMPT]
        assert main([*argv, "--max-new-tokens", "4", "--echo"]) == 0
        outputs.append((scored, capsys.readouterr().out))
    (by_id, text), (by_dir, text_dir) = outputs
    assert by_id == by_dir and text == text_dir and PROMPT in text


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
        "chat": [],
        "merge": ["--adapter", str(adapter), "--out", str(tmp / "merged")],
        "serve": [],
        "export": ["--adapter", str(adapter), "--format", "onnx", "--out", str(tmp / "onnx")],
        "inspect": [str(adapter)],
    }


@pytest.mark.parametrize(
    "command", ["finetune", "eval", "predict", "generate", "chat", "merge", "serve", "export", "inspect"]
)
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
