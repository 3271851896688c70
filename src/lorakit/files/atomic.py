"""Atomic file writes, and a lock per directory for files that must change together.

A reader sees the old file or the new one, never a torn one: the new content goes to a temporary file
beside the target, is fsynced, renamed over the target, and the directory is fsynced. The temporary
file is created the way `open(path, "w")` creates a file (mode 0o666 minus the umask), so what lorakit
writes gets the permissions any other program's files get, not `mkstemp`'s 0600.

An adapter is two files (config and weights). `locked_dir` serialises writers and readers of one
directory with `flock` on the directory itself (no lock file beside the user's files), so two saves
into one directory never leave one adapter's weights with the other's config, and a reader sees one
whole adapter. A crash between the renames can still leave the new weights with the old config and the
old `lorakit.json` (written last); a load refuses that pair by the tensor hashes the sidecar records.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# flock fails with these where a file system cannot lock a directory (e.g. NFS emulates flock with
# byte-range locks, which need a file open for writing): saves are then atomic per file only.
_NO_LOCKS = (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A fresh temporary path beside `path` to write; when the block ends it atomically replaces `path`.

    If the block raises, the temporary file is removed and `path` is left as it was.

    Examples:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "notes.txt"
        >>> with replacing(target) as tmp:
        ...     _ = tmp.write_text("hello")
        >>> target.read_text()
        'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path)
    try:
        yield tmp  # writers that take a file name (safetensors) open it themselves
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name points at it
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def replacing_dir(path: str | Path) -> Iterator[Path]:
    """A fresh empty directory beside `path` to fill; when the block ends it takes `path`'s place.

    If the block raises, the new directory is removed and `path` (if any) is left as it was. The old
    `path` is renamed aside, the new one renamed in, then the old one removed: a crash between the two
    renames leaves the old one whole, as `.NAME.<hex>.old` beside it.

    Examples:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "merged"
        >>> with replacing_dir(target) as tmp:
        ...     _ = (tmp / "weights").write_text("new")
        >>> [p.name for p in target.iterdir()]
        ['weights']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.mkdir(tmp, 0o777)  # the umask applies, as for any new directory
            break
        except FileExistsError:
            continue
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.{secrets.token_hex(6)}.old") if path.exists() else None
    if old is not None:
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _new_temp(path: Path) -> Path:
    """Create an empty, never-used temporary file beside `path` (O_EXCL: never another writer's) and name it."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as in open()
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write bytes to `path` so a reader sees the old file or the new one, never a torn one.

    Examples:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "blob.bin"
        >>> atomic_write(target, b"abc"); target.read_bytes()
        b'abc'
    """
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_json(path: str | Path, obj: object) -> None:
    """Write `obj` as indented JSON with a final newline, atomically.

    Examples:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "config.json"
        >>> write_json(target, {"r": 8}); target.read_text()
        '{\\n  "r": 8\\n}\\n'
    """
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def locked_dir(directory: str | Path, *, exclusive: bool = True) -> Iterator[Path]:
    """Hold a lock on `directory` for the block: exclusive to write its files, shared to read them.

    Threads and processes alike wait for each other (flock on a descriptor of the directory itself).
    An exclusive lock creates the directory if needed.

    Examples:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()) / "adapter"
        >>> with locked_dir(d) as held:
        ...     write_json(held / "adapter_config.json", {"r": 8})
        >>> sorted(p.name for p in d.iterdir())
        ['adapter_config.json']
    """
    directory = Path(directory)
    if exclusive:
        directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
        yield directory
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
