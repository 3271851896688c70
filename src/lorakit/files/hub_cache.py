"""The Hugging Face hub cache's layout, read from a path: which hub model and commit a snapshot directory holds.

    <cache>/models--ORG--NAME/refs/main                      the commit a branch or tag points to
    <cache>/models--ORG--NAME/snapshots/<commit>/config.json the model's files at that commit

A base loaded from a snapshot is recorded by its hub id and commit (adapter_config.json's
`base_model_name_or_path` and `revision`, as PEFT writes them for a model loaded by id), never by the cache
path, which differs from machine to machine. Only the path is read: nothing here touches the disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO_PREFIX = "models--"  # huggingface_hub names a model's folder models--ORG--NAME ("/" -> "--")
SNAPSHOTS = "snapshots"
COMMIT = re.compile(r"[0-9a-f]{40}")  # a snapshot folder is named by its full commit hash


@dataclass(frozen=True)
class Snapshot:
    """A hub model at one commit: `repo_id` is ORG/NAME, `commit` the 40-hex commit hash."""

    repo_id: str
    commit: str


def snapshot_of(path: str | Path | None) -> Snapshot | None:
    """The hub model and commit a snapshot directory of the cache holds; None for any other path.

    Examples:
        >>> snapshot_of("/cache/hub/models--acme--tiny-chat/snapshots/" + "0" * 40)
        Snapshot(repo_id='acme/tiny-chat', commit='0000000000000000000000000000000000000000')
        >>> snapshot_of("models/tiny-chat") is None
        True
    """
    if path is None:
        return None
    parts = Path(path).parts
    if len(parts) < 3 or parts[-2] != SNAPSHOTS or not COMMIT.fullmatch(parts[-1]):
        return None
    folder = parts[-3]
    if not folder.startswith(REPO_PREFIX):
        return None
    names = folder[len(REPO_PREFIX) :].split("--")  # a hub id never holds "--", so the split is exact
    if len(names) != 2 or not all(names):
        return None
    return Snapshot(repo_id="/".join(names), commit=parts[-1])


def repo_folder(repo_id: str) -> str:
    """The cache folder of a hub model: models--ORG--NAME.

    Examples:
        >>> repo_folder("acme/tiny-chat")
        'models--acme--tiny-chat'
    """
    return REPO_PREFIX + repo_id.replace("/", "--")
