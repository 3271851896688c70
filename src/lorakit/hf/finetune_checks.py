"""The finetune job's checks before anything loads: the output directory, and every input path it names."""

from __future__ import annotations

from pathlib import Path

from ..files.peft_format import CONFIG_NAME, WEIGHTS_NAME
from ..train.artifacts import CHECKPOINT
from . import models as hf


def check_out(out: Path, run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """`out` must be new or empty, unless the job resumes (then its checkpoint must be there) or overwrites."""
    if resume:
        if not (run_dir / CHECKPOINT).is_file():
            raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from (run once without resume first)")
    elif not overwrite:
        hf.check_output_dir(out)  # resume=True continues the run there, overwrite=True replaces it


# the job's input files, and what each is called in an error
INPUT_PATHS = (("data", "data file or directory"), ("valid", "validation file or directory"))
INPUT_FILES = (("reference", "the reference text file does not exist"), ("chat_template", "no such chat template file"))


def check_input_paths(job: object) -> None:
    """FileNotFoundError naming the first of the job's input paths that is not there."""
    for name, what in INPUT_PATHS:
        path = getattr(job, name)
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{path}: no such {what}")
    for name, said in INPUT_FILES:
        path = getattr(job, name)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{path}: {said}")
    for name in ("init_adapter", "ref_adapter"):  # adapter directories: a PEFT config and weights
        path = getattr(job, name)
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such adapter directory ({name})")
        missing = [f for f in (CONFIG_NAME, WEIGHTS_NAME) if path is not None and not (Path(path) / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: not an adapter directory ({name}): no {' or '.join(missing)}")
