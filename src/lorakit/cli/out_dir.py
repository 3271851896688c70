"""What a `lorakit finetune --out DIR` already holds, and the advice that fits it.

    new or empty        start the run
    a checkpoint        a run that can go on: --resume (or --overwrite to start again)
    a run dir, no ckpt  a run that stopped before its first checkpoint: nothing to resume; --overwrite
    anything else       someone else's files: --overwrite or a new --out

`--out OUT --resume` alone resumes: the flags OUT/run/run.toml records become the defaults (`recorded_run`,
read by runfile.pre_parse), so only what the command line gives is compared.
A resumed run must be the same run: its flags are compared with the run file the first run recorded
(OUT/run/run.toml), or, for a run without one, its training settings with the checkpoint's, before any
training starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..hf.finetune import RUN_DIR
from ..train.artifacts import CHECKPOINT
from . import runfile
from .common import BadInput, new_or_empty

RUN_FILE = "run.toml"
NOT_RECORDED = ("resume", "overwrite")  # what to do with OUT, not what the run is
MAY_CHANGE_ON_RESUME = (*NOT_RECORDED, "plain")  # ... and how it is shown


def checkpoint(out: Path) -> Path:
    """Where the run in `out` keeps its checkpoint."""
    return out / RUN_DIR / CHECKPOINT


def check_start(out: Path, resume: bool, overwrite: bool) -> None:
    """BadInput unless OUT suits the flags, with advice for what OUT holds."""
    if overwrite:
        return
    stopped_early = (out / RUN_DIR).is_dir() and not checkpoint(out).is_file()
    if resume:
        if checkpoint(out).is_file():
            return
        if stopped_early:
            raise BadInput(
                f"{out}: the run there stopped before its first checkpoint, so there is nothing to resume; "
                "pass --overwrite (instead of --resume) to start it again, or choose a new --out"
            )
        raise BadInput(f"{out}: no run to resume there (no {RUN_DIR}/{CHECKPOINT}); run without --resume to start one")
    if checkpoint(out).is_file():
        remedy = "pass --resume to continue that run, --overwrite to replace it, or choose a new --out"
    elif stopped_early:
        remedy = (
            "the run there stopped before its first checkpoint (nothing to resume); "
            "pass --overwrite to start it again, or choose a new --out"
        )
    else:
        remedy = "pass --overwrite to replace it, or choose a new --out"
    new_or_empty(out, remedy)


def check_same_run(out: Path, args: argparse.Namespace, parser: argparse.ArgumentParser, train: dict[str, Any]) -> None:
    """BadInput naming every flag that differs from the run being resumed (old -> new), before any training."""
    recorded = out / RUN_DIR / RUN_FILE
    if recorded.is_file():
        old = runfile.read(recorded, parser)
        now = runfile.resolved(args, parser)
        defaults = {d: a.default for d, a in runfile.flag_actions(parser).items()}
        keys = [k for k in now if k not in MAY_CHANGE_ON_RESUME and old.get(k, defaults.get(k)) != now[k]]
        diff = {k: (old.get(k), now[k]) for k in keys}
        where = recorded
    else:  # a run from before run files: its checkpoint holds the training settings
        from ..train.checkpoint import read_checkpoint

        saved = read_checkpoint(checkpoint(out)).state.get("config", {})
        diff = {k: (saved.get(k), v) for k, v in train.items() if saved.get(k) != v}
        where = checkpoint(out)
    if diff:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())
        raise BadInput(
            f"--resume continues the run in {out} with its own settings, but these differ from {where}: {listed}; "
            "drop them to resume, or pass --overwrite (or a new --out) to start a new run"
        )


def recorded_run(argv: Sequence[str]) -> Path | None:
    """The run file of `--out OUT --resume` in `argv` (OUT/run/run.toml), whose flags are then the defaults."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--out")
    pre.add_argument("--resume", action="store_true")
    known, _ = pre.parse_known_args(list(argv))
    if not known.resume or known.out is None:
        return None
    path = Path(known.out) / RUN_DIR / RUN_FILE
    return path if path.is_file() else None
