"""`finetune --overwrite`: the previous run's files set aside in OUT/.previous-<UTC time>/ when the new run starts.

    OUT/adapter_model.safetensors, OUT/run/...   ->   OUT/.previous-20261207T120102Z/adapter_model.safetensors, ...

so that nothing of the old run stays where a loader takes an adapter from (`serve`, `load_adapters`, eval and
predict with `--adapter OUT`) while the new run has written only part of its own. The folder is deleted when
the new run finishes; a run refused before training (bad data, a model that does not fit) puts the files back;
an interrupted or killed run leaves them in the folder, and the interrupt message says where.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

PREFIX = ".previous-"


def set_aside(out: Path) -> Path | None:
    """Move everything in `out` (but folders set aside before) into a new `out/.previous-<time>/`; its path,
    or None when `out` held nothing."""
    if not out.is_dir():
        return None
    entries = sorted((p for p in out.iterdir() if not p.name.startswith(PREFIX)), key=_adapter_first)
    if not entries:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest, n = out / f"{PREFIX}{stamp}", 1
    while dest.exists():  # two runs within a second
        dest, n = out / f"{PREFIX}{stamp}-{n}", n + 1
    dest.mkdir()
    for p in entries:  # renames within one directory: no copying, whatever the size
        p.rename(dest / p.name)
    return dest


def _adapter_first(path: Path) -> tuple[bool, str]:
    """The files a loader reads (OUT's own) move before the run folder."""
    return (path.is_dir(), path.name)


def put_back(out: Path, previous: Path) -> None:
    """Undo `set_aside` for a run refused before training: remove what it wrote to `out`, move the old files back."""
    for p in out.iterdir():
        if p != previous and not p.name.startswith(PREFIX):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in previous.iterdir():
        p.rename(out / p.name)
    previous.rmdir()


def discard(previous: Path) -> None:
    """Delete what `set_aside` moved away, once the run that replaces it has finished."""
    shutil.rmtree(previous, ignore_errors=True)


def earlier(out: Path) -> list[Path]:
    """Folders of runs replaced by --overwrite that were kept because the new run did not finish."""
    return sorted(p for p in out.glob(f"{PREFIX}*") if p.is_dir()) if out.is_dir() else []
