"""`lorakit finetune --config run.toml`, the run file every run records, progress on stderr, and the advice
the CLI gives for what OUT holds (resume, overwrite, Ctrl-C, changed flags)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parents[1]))
import _cli_hold  # noqa: E402
import _hf_models  # noqa: E402

from lorakit.cli import build_parser, main, runfile  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
LORAKIT = [sys.executable, "-m", "lorakit"]


def lorakit(*args, merged: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """A real `lorakit` process; `merged`: stderr into stdout, so the order of the two shows."""
    return subprocess.run(
        [*LORAKIT, *map(str, args)],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
        timeout=300,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """One real finetune run (checkpoint, adapter, run.toml), with its stdout+stderr."""
    root = tmp_path_factory.mktemp("runfile")
    model = _hf_models.save_tiny("gpt2", root / "gpt2")
    rows = root / "train.jsonl"
    rows.write_text("".join(json.dumps({"text": s}) + "\n" for s in _hf_models.SENTENCES * 3))
    out = root / "first"
    # relative paths on the command line (cwd=root): the run file records them absolute
    r = lorakit(
        "finetune",
        "--model",
        "gpt2",
        "--data",
        "train.jsonl",
        "--task",
        "causal-lm",
        "--out",
        "first",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--rank",
        "4",
        "--dropout",
        "0.1",
        "--device",
        "cpu",
        "--plain",
        merged=True,
        cwd=root,
    )
    assert r.returncode == 0, r.stdout[-3000:]
    return {"root": root, "model": model, "rows": rows, "out": out, "log": r.stdout}


def _main(capsys, *argv) -> tuple[int, str]:
    """`lorakit ARGV` in-process (cheap for checks that stop before any model loads): (status, stderr)."""
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err


# -- the run file ---------------------------------------------------------------------------------------


def test_the_recorded_run_file_repeats_the_run_exactly(run, tmp_path):
    recorded = run["out"] / "run" / "run.toml"
    values = tomllib.loads(recorded.read_text())
    assert values["model"] == str(run["model"]) and values["data"] == str(run["rows"])  # absolute
    assert values["rank"] == 4 and values["dropout"] == 0.1 and values["targets"] == ["all-linear"]
    assert values["max_length"] == 256 and values["lr"] == 5e-4  # defaults too: every flag's resolved value
    assert "resume" not in values and "overwrite" not in values and "config" not in values

    again = tmp_path / "again"
    r = lorakit("finetune", "--config", recorded, "--out", again)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (again / "adapter_model.safetensors").read_bytes() == (run["out"] / "adapter_model.safetensors").read_bytes()
    assert tomllib.loads((again / "run" / "run.toml").read_text()) == {**values, "out": str(again)}


def test_finetune_shows_loading_and_tokenizing_before_training(run):
    lines = run["log"].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("start "))
    before = "\n".join(lines[:start])
    for step in (
        "loading the tokenizer of gpt2",
        "reading train.jsonl",
        "tokenizing",
        "loading the model gpt2",
        "adding LoRA",
    ):
        shown = [line for line in lines[:start] if line.startswith(step)]
        assert any(line.endswith(" ...") for line in shown) and any(" in " in line for line in shown), (step, before)


def test_run_file_keys_tables_spellings_paths_and_command_line_override(tmp_path):
    conf = tmp_path / "conf" / "run.toml"
    conf.parent.mkdir()
    conf.write_text(
        'model = "../models/tiny"\ndata = "rows.jsonl"\ntask = "seq-cls"\nout = "/abs/out"\n'
        'max-length = 64\nplain = true\n[lora]\nrank = 16\ntargets = ["q_proj", "v_proj"]\n'
        "[training]\nlr = 1\n"
    )
    argv = ["finetune", "--config", str(conf), "--rank", "2"]
    parser = build_parser()
    runfile.pre_parse(parser, argv)
    args = parser.parse_args(argv)
    assert args.rank == 2  # the command line wins
    assert args.max_length == 64 and args.plain is True and args.targets == ["q_proj", "v_proj"]
    assert args.lr == 1.0 and isinstance(args.lr, float)  # an int where a number is expected
    assert args.model == str(conf.parent / "../models/tiny") and args.data == str(conf.parent / "rows.jsonl")
    assert args.out == "/abs/out" and args.task == "seq-cls"


def test_a_flag_added_to_the_parser_is_a_key_at_once(tmp_path):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["finetune"]
    sub.add_argument("--warmup-ratio", type=float)  # as another part of lorakit would add one
    conf = tmp_path / "run.toml"
    conf.write_text("warmup_ratio = 0.5\n")
    assert runfile.read(conf, sub) == {"warmup_ratio": 0.5}


@pytest.mark.parametrize(
    "text,says",
    [
        ("rank = 8\nnope = 1\n", "unknown key 'nope'; the keys are the flags of this command: model, revision, data"),
        ('rank = "8"\n', 'rank = "8" is invalid: expected an integer'),
        ("rank = 8.5\n", "rank = 8.5 is invalid: expected an integer"),
        ("lr = true\n", "lr = true is invalid: expected a number"),
        ('task = "regression"\n', 'task = "regression" is invalid: expected one of causal-lm, seq-cls'),
        ('plain = "yes"\n', 'plain = "yes" is invalid: expected true or false'),
        ('targets = "q_proj"\n', 'targets = "q_proj" is invalid: expected a list'),
        ("model = 3\n", "model = 3 is invalid: expected a string"),
        ("rank = 8\n[lora]\nrank = 4\n", "key 'rank' is given twice"),
        ("rank = \n", "not valid TOML"),
    ],
)
def test_a_bad_run_file_exits_2_naming_file_key_and_expectation(tmp_path, capsys, text, says):
    conf = tmp_path / "run.toml"
    conf.write_text(text)
    status, err = _main(
        capsys,
        "finetune",
        "--config",
        conf,
        "--model",
        "m",
        "--data",
        "d",
        "--task",
        "causal-lm",
        "--out",
        tmp_path / "o",
    )
    assert status == 2 and err.startswith(f"lorakit finetune: error: {conf}") and says in err, err
    assert not (tmp_path / "o").exists()


def test_a_missing_run_file_exits_2(tmp_path, capsys):
    status, err = _main(capsys, "finetune", "--config", tmp_path / "none.toml")
    assert status == 2 and f"--config {tmp_path / 'none.toml'}: no such file" in err


@given(
    st.one_of(
        st.text(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False),
        st.booleans(),
        st.lists(st.text(max_size=5), max_size=3),
    )
)
def test_the_toml_writer_round_trips_what_a_flag_holds(value):
    assert tomllib.loads(f"key = {runfile._toml(value)}")["key"] == value


# -- OUT's state: the advice fits it ---------------------------------------------------------------------


def test_advice_for_each_state_of_out(run, tmp_path, capsys):
    flags = ["--model", run["model"], "--data", run["rows"], "--task", "causal-lm", "--device", "cpu"]
    status, err = _main(capsys, "finetune", *flags, "--out", run["out"])  # a checkpoint: resume or overwrite
    assert status == 2 and "pass --resume to continue that run, --overwrite to replace it" in err

    stopped = tmp_path / "stopped"  # a run that died before its first checkpoint
    (stopped / "run").mkdir(parents=True)
    (stopped / "run" / "metrics.jsonl").write_text("")
    status, err = _main(capsys, "finetune", *flags, "--out", stopped)
    assert status == 2 and "stopped before its first checkpoint" in err and "--overwrite" in err
    assert "--resume to" not in err
    status, err = _main(capsys, "finetune", *flags, "--out", stopped, "--resume")
    assert status == 2 and "stopped before its first checkpoint, so there is nothing to resume" in err
    assert "pass --overwrite (instead of --resume)" in err

    other = tmp_path / "other"  # someone else's files
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    status, err = _main(capsys, "finetune", *flags, "--out", other)
    assert status == 2 and "pass --overwrite to replace it, or choose a new --out" in err and "--resume" not in err
    status, err = _main(capsys, "finetune", *flags, "--out", tmp_path / "new", "--resume")
    assert status == 2 and "no run to resume there" in err and "run without --resume" in err
    assert (other / "notes.txt").read_text() == "mine" and not (tmp_path / "new").exists()


def test_resume_with_changed_flags_exits_2_naming_them(run, tmp_path, capsys):
    recorded = run["out"] / "run" / "run.toml"
    status, err = _main(
        capsys, "finetune", "--config", recorded, "--resume", "--lr", "1e-3", "--rank", "8", "--plain"
    )  # --plain may change: it is how the run is shown
    assert status == 2, err
    assert "rank: 4 -> 8; lr: 0.0005 -> 0.001" in err and str(recorded) in err and "plain" not in err

    status, err = _main(capsys, "finetune", "--out", run["out"], "--resume", "--rank", "8", "--lr", "5e-4")
    assert status == 2 and "rank: 4 -> 8" in err and "lr:" not in err, err  # --out alone: the recorded flags

    older = tmp_path / "older"  # a run from before run files: the checkpoint's settings are compared
    shutil.copytree(run["out"], older)
    (older / "run" / "run.toml").unlink()
    status, err = _main(capsys, "finetune", "--config", recorded, "--out", older, "--resume", "--lr", "1e-3")
    assert status == 2 and "lr: 0.0005 -> 0.001" in err and "checkpoint.safetensors" in err, err


def test_ctrl_c_after_a_checkpoint_exits_130_with_a_resume_hint(run, tmp_path):
    marker = "checkpoint step=1 "
    flags = ["--model", run["model"], "--data", run["rows"], "--task", "causal-lm", "--out", tmp_path / "out"]
    flags += ["--epochs", "3", "--batch-size", "8", "--checkpoint-every", "1", "--device", "cpu", "--plain"]
    held = _cli_hold.signal_at(marker, ["finetune", *flags], signal.SIGINT, ENV)
    err = held.err
    assert held.returncode == 130, (held.returncode, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("lorakit finetune: interrupted; the last checkpoint is in ") and "--resume" in last
    assert last.endswith(f"; resume with: lorakit finetune --out {tmp_path / 'out'} --resume"), last  # the command
    assert "Traceback" not in err


def test_the_setup_line_echoes_packing_speed_and_checkpointing(run):
    lines = run["log"].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("start "))
    setup = lines[start - 1]  # said before the first step
    assert re.fullmatch(
        r"setup pack=off padding=\d+\.\d% padding_if_packed=\d+\.\d% loss=(plain|chunked) fuse=(on|off) compile=off "
        r"gradient_checkpointing=off "
        r"checkpoint_every=epoch checkpoint=first/run/checkpoint\.safetensors",
        setup,
    ), setup


OLD_RUN = ("adapter_model.safetensors", "adapter_config.json", "lorakit.json", "run/finetune_report.json")


def _killed_at(marker: str, argv: list) -> tuple[list[str], str]:
    """`lorakit ARGV`, held still after its stdout line starting with `marker` and SIGKILLed there: (lines, stderr)."""
    held = _cli_hold.signal_at(marker, argv, signal.SIGKILL, ENV)
    assert held.returncode == -signal.SIGKILL, "".join(held.seen) + held.err
    return held.seen, held.err


def test_overwrite_then_kill_leaves_no_old_run_in_out_and_out_alone_resumes(run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)  # a finished run
    old = {name: (out / name).read_bytes() for name in OLD_RUN}
    rows, valid = tmp_path / "same.jsonl", tmp_path / "valid.jsonl"
    rows.write_text((json.dumps({"text": "the cat sat on the mat"}) + "\n") * 9)  # one length: 2 per packed row
    valid.write_text("".join(json.dumps({"text": s}) + "\n" for s in _hf_models.SENTENCES[:2]))
    flags = ["--model", run["model"], "--data", rows, "--valid", valid, "--task", "causal-lm", "--rank", "4"]
    flags += ["--max-length", "16", "--batch-size", "8", "--epochs", "3", "--device", "cpu", "--plain", "--pack"]
    marker = "checkpoint step=1 "  # the new run's first checkpoint is written
    seen, err = _killed_at(marker, ["finetune", *flags, "--out", out, "--overwrite", "--checkpoint-every", "1"])

    setup = next(x for x in seen if x.startswith("setup "))  # 9 rows of one length: 4 rows of 2 and 1 of 1
    assert "pack=on padding=10.0% padding_if_unpacked=0.0%" in setup and "checkpoint_every=1 " in setup, setup
    assert "warning: --pack makes the padding worse here (0.0% -> 10.0% of the tokens)" in err, err
    said = re.search(r"--overwrite: what \S+ held is now in (\S+); it is deleted when this run finishes", err)
    assert said, err
    previous = Path(said.group(1))
    assert previous.parent == out and previous.name.startswith(".previous-")
    for name in OLD_RUN:  # nothing of the old run where a loader looks; all of it where the message said
        assert not (out / name).exists(), name
        assert (previous / name).read_bytes() == old[name], name
    assert (out / "run" / "checkpoint.safetensors").is_file()

    status = main(["finetune", "--out", str(out), "--resume", "--rank", "4"])  # --rank agrees with the run: taken
    printed = capsys.readouterr()
    assert status == 0, printed.err[-3000:]
    assert "resumed_at_step=1 " in printed.out and "done steps=3 " in printed.out, printed.out
    assert (out / "adapter_model.safetensors").is_file() and (out / "run" / "finetune_report.json").is_file()
    assert f"note: {previous} holds a run replaced by --overwrite" in printed.err  # kept, and said so


# -- the model must fit the task -------------------------------------------------------------------------


def test_an_encoder_as_causal_lm_exits_2_saying_what_it_can_do(tmp_path, capsys):
    rows = tmp_path / "t.jsonl"
    rows.write_text("".join(json.dumps({"text": s}) + "\n" for s in _hf_models.SENTENCES))
    status, err = _main(
        capsys,
        "finetune",
        "--model",
        _hf_models.minilm_dir(),
        "--data",
        rows,
        "--task",
        "causal-lm",
        "--out",
        tmp_path / "o",
        "--device",
        "cpu",
    )
    assert status == 2, err
    assert "bert is an encoder (bidirectional attention); it cannot be fine-tuned as a causal-lm" in err
    assert err.rstrip().endswith("use --task seq-cls")  # told from config.json, before the data is read
    assert not (tmp_path / "o").exists()
