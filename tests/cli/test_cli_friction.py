"""The first contact with the command line: "did you mean" for typed names, the subcommand's own usage on a bad
flag, every row form in `finetune --help`, and paths checked before any model or tokenizer loads."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

from lorakit.cli import build_parser, main  # noqa: E402
from lorakit.hf.examples import FORMS  # noqa: E402


def _usage_error(capsys, *argv) -> str:
    """`lorakit ARGV` in-process, expected to be refused by argparse (exit 2): its stderr."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    assert exit_.value.code == 2
    return capsys.readouterr().err


REQUIRED = ["--model", "m", "--data", "d.jsonl", "--task", "causal-lm", "--out", "o"]


@pytest.mark.parametrize(
    "argv,says,guess",
    [
        (["finetun"], "invalid choice: 'finetun' (choose from 'example', 'finetune', ", "did you mean 'finetune'?"),
        (["finetune", *REQUIRED, "--max-lenght", "64"], "unrecognized arguments: --max-lenght 64", "--max-length?"),
        (["finetune", *REQUIRED, "--lerning-rate", "1"], "arguments: --lerning-rate 1", "--learning-rate?"),
        (["finetune", "--task", "causal_lm"], "argument --task: invalid choice: 'causal_lm'", "mean 'causal-lm'?"),
        (["eval", "--model", "m", "--data", "d", "--adaptr", "a"], "unrecognized arguments: --adaptr a", "--adapter?"),
    ],
)
def test_a_typo_gets_the_closest_name(capsys, argv, says, guess):
    err = _usage_error(capsys, *argv)
    assert says in err and err.rstrip().endswith(f"; did you mean {guess.split()[-1]}"), err


def test_an_unknown_flag_shows_the_subcommands_usage(capsys):
    err = _usage_error(capsys, "finetune", *REQUIRED, "--nothing-like-it")
    assert err.startswith("usage: lorakit finetune ") and "lorakit finetune: error: unrecognized arguments" in err
    assert "did you mean" not in err  # nothing close: no guess
    err = _usage_error(capsys, "merge", "--model", "m", "--adapter", "a", "--out", "o", "--weigth", "a=1")
    assert err.startswith("usage: lorakit merge ") and err.rstrip().endswith("did you mean --weight?"), err


def test_the_learning_rate_has_its_usual_long_name_too():
    args = build_parser().parse_args(["finetune", *REQUIRED, "--learning-rate", "1e-3"])
    assert args.lr == 1e-3


def test_finetune_help_lists_every_row_form_of_every_task():
    sub = build_parser()._subparsers._group_actions[0].choices["finetune"]
    text = sub.format_help()
    samples = re.findall(r"^  (?:causal-lm|seq-cls|dpo|grpo)? +(\{.*?\})(?:  |$)", text, flags=re.M)
    forms = [form for task in FORMS.values() for form in task]
    assert len(samples) == len(forms) == 8, text  # causal-lm's 4 forms, seq-cls's 1, dpo's 1, grpo's 2
    for sample, form in zip(samples, forms, strict=True):
        assert re.findall(r'"(\w+)":', sample) == list(form), (sample, form)


# -- paths are checked before anything loads -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paths")
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": s}) + "\n" for s in _hf_models.SENTENCES))
    return {"model": _hf_models.save_tiny("gpt2", root / "gpt2"), "rows": rows}


def _refused(capsys, *argv) -> str:
    """`lorakit ARGV` in-process, refused with exit 2: its stderr, which must show that nothing was loaded."""
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "loading" not in err, err  # no tokenizer, no model: the progress lines say when they load
    return err


def test_a_missing_data_file_is_reported_before_the_tokenizer_and_model_load(tiny, tmp_path, capsys):
    flags = ["finetune", "--model", tiny["model"], "--task", "causal-lm", "--device", "cpu"]
    err = _refused(capsys, *flags, "--data", tmp_path / "nope.jsonl", "--out", tmp_path / "o")
    assert f"{tmp_path / 'nope.jsonl'}: no such data file or directory" in err, err
    err = _refused(capsys, *flags, "--data", tiny["rows"], "--valid", tmp_path / "v.jsonl", "--out", tmp_path / "o")
    assert f"{tmp_path / 'v.jsonl'}: no such validation file or directory" in err, err
    assert not (tmp_path / "o").exists()


def test_an_out_that_cannot_be_written_is_reported_at_once(tiny, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    flags = ["finetune", "--model", tiny["model"], "--data", tiny["rows"], "--task", "causal-lm"]
    err = _refused(capsys, *flags, "--out", a_file / "adapter")
    assert f"--out {a_file / 'adapter'}: {a_file} is a file, so nothing can be created under it" in err, err
    err = _refused(capsys, "merge", "--model", tiny["model"], "--adapter", tmp_path, "--out", a_file)
    assert f"--out {a_file}: is a file; expected a directory" in err, err
    assert a_file.read_text() == "mine"


@pytest.mark.parametrize("command", ["eval", "predict", "generate", "serve"])
def test_a_missing_adapter_is_reported_before_the_model_loads(tiny, tmp_path, capsys, command):
    more = {"eval": ["--data", tiny["rows"]], "generate": ["--prompt", "the cat"], "predict": [], "serve": []}
    missing = tmp_path / "adapters" / "typo"
    err = _refused(capsys, command, "--model", tiny["model"], "--adapter", f"a={missing}", *more[command])
    assert f"--adapter {missing}: no such directory" in err, err


def test_an_overwrite_refused_before_training_puts_the_previous_run_back(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "run").mkdir(parents=True)
    (out / "adapter_model.safetensors").write_bytes(b"old adapter")
    (out / "run" / "checkpoint.safetensors").write_bytes(b"old checkpoint")
    flags = ["finetune", "--model", tiny["model"], "--task", "causal-lm", "--device", "cpu", "--overwrite"]
    err = _refused(capsys, *flags, "--data", tmp_path / "nope.jsonl", "--out", out)
    assert "no such data file or directory" in err and f"{out} holds its previous files again" in err, err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "adapter_model.safetensors",
        "run",
        "run/checkpoint.safetensors",
    ]
    assert (out / "adapter_model.safetensors").read_bytes() == b"old adapter"
