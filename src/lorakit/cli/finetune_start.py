"""How `lorakit finetune` starts a run: OUT made ready (`--overwrite` sets the previous run aside, and puts it
back when the new run is refused), and the setup line that says what the run will do before its first step:

    setup pack=on padding=10.1% padding_if_unpacked=6.5% gradient_checkpointing=off checkpoint_every=epoch ...
    warning: --pack makes the padding worse here (6.5% -> 10.1% of the tokens); ...

The padding fractions come from the encoded rows' token counts (packing.padding_effect), before training.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ..hf import finetune as job_module
from ..hf import packing
from ..ui.progress import Progress
from . import out_dir, set_aside
from .common import inputs


def make_room(job: job_module.FinetuneJob) -> Path | None:
    """With --overwrite, move what OUT holds to OUT/.previous-<time>/ and say so; the folder, or None."""
    out = Path(job.out)
    previous = set_aside.set_aside(out) if job.overwrite else None
    if previous is not None:
        print(
            f"--overwrite: what {out} held is now in {previous}; it is deleted when this run finishes",
            file=sys.stderr,
        )
    return previous


def prepare(job: job_module.FinetuneJob, previous: Path | None, progress: Progress) -> job_module.Setup:
    """The job prepared (input errors exit 2); a run refused or stopped before training puts `previous` back."""
    try:
        return inputs(job_module.prepare, job, progress=progress)
    except BaseException:
        if previous is not None:
            set_aside.put_back(Path(job.out), previous)
            print(f"--overwrite: the run did not start; {job.out} holds its previous files again", file=sys.stderr)
        raise


def finish(job: job_module.FinetuneJob, previous: Path | None) -> None:
    """After a finished run: delete what --overwrite set aside; name what earlier unfinished runs left."""
    if previous is not None:
        set_aside.discard(previous)
    for kept in set_aside.earlier(Path(job.out)):
        print(f"note: {kept} holds a run replaced by --overwrite; delete it once you do not need it", file=sys.stderr)


def interrupt_hint(out: Path, previous: Path | None) -> str | None:
    """What to say after Ctrl-C: the command that resumes (once there is a checkpoint), and where the
    previous run went."""
    said = []
    if out_dir.checkpoint(out).is_file():
        said.append(
            f"the last checkpoint is in {out_dir.checkpoint(out)}; resume with: "
            f"lorakit finetune --out {shlex.quote(str(out))} --resume"
        )
    if previous is not None and previous.is_dir():
        said.append(f"the run it replaced (--overwrite) is kept in {previous}")
    return "; ".join(said) or None


def setup_line(setup: job_module.Setup) -> str:
    """The run's packing (with its padding effect) and checkpointing, as one `setup key=value ...` line."""
    job = setup.job
    fields = [f"pack={'on' if job.pack else 'off'}"]
    effect = _padding(setup)
    if effect is not None:
        unpacked, packed = effect
        now, other = (packed, unpacked) if job.pack else (unpacked, packed)
        fields += [f"padding={100 * now:.1f}%", f"padding_if_{'unpacked' if job.pack else 'packed'}={100 * other:.1f}%"]
    every = job.train.checkpoint_every
    fields += [f"{k}={v}" for k, v in setup.speed.items().items()]
    fields += [
        f"gradient_checkpointing={'on' if job.gradient_checkpointing else 'off'}",
        f"checkpoint_every={every if every else 'epoch'}",
        f"checkpoint={out_dir.checkpoint(Path(job.out))}",
    ]
    return "setup " + " ".join(fields)


def _padding(setup: job_module.Setup) -> tuple[float, float] | None:
    """(unpacked, packed) padding fractions of the training rows; None where packing does not apply."""
    job = setup.job
    if setup.packing is not None:
        return setup.packing["padding_fraction_unpacked"], setup.packing["padding_fraction_packed"]
    if job.task != "causal-lm":
        return None
    return packing.padding_effect(setup.prepared.train, job.max_length, job.batch_size, job.train.seed)


def say_setup(setup: job_module.Setup) -> None:
    """Print what the target rules selected and the setup line; warn on stderr when packing makes the padding worse."""
    for line in setup.matched:
        print(f"targets {line}", flush=True)
    print(setup_line(setup), flush=True)
    effect = _padding(setup)
    if setup.job.pack and effect is not None and effect[1] > effect[0]:
        print(
            f"warning: --pack makes the padding worse here ({100 * effect[0]:.1f}% -> {100 * effect[1]:.1f}% of "
            "the tokens): the rows are close in length, so packed rows pad more than a batch of them; "
            "train without --pack",
            file=sys.stderr,
        )
