"""A Hugging Face hub cache on disk, laid out as huggingface_hub writes it, holding tiny random models (no network).

    <home>/hub/models--lorakit-test--tiny-llama/
        blobs/<sha256>                          each file's bytes
        refs/main                               -> MAIN (a tiny Llama, seed 0)
        refs/v2                                 -> V2   (a tiny GPT-2: another model, so a revision is visible)
        snapshots/<MAIN>/config.json ...        links into blobs/, as huggingface_hub makes them

`build(home)` writes it; tests point HF_HOME at `home` and set HF_HUB_OFFLINE=1 (the `hub_cache` fixture of
tests/conftest.py builds one per session; `hub_env` sets the environment for one test).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import _hf_models

REPO = "lorakit-test/tiny-llama"
MAIN = "1" * 40
V2 = "2" * 40
BRANCH = "v2"
ABSENT = "lorakit-test/not-downloaded"


@dataclass(frozen=True)
class HubCache:
    """Where the cache is: HF_HOME (`home`), its hub folder (`cache`), and the snapshot of each commit."""

    home: Path
    repo_id: str = REPO

    @property
    def cache(self) -> Path:
        return self.home / "hub"

    def snapshot(self, commit: str) -> Path:
        return self.cache / ("models--" + self.repo_id.replace("/", "--")) / "snapshots" / commit

    def env(self) -> dict[str, str]:
        """The environment of a subprocess that sees only this cache, offline."""
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
        return {**env, "HF_HOME": str(self.home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def build(home: Path) -> HubCache:
    """A cache under `home` with REPO at MAIN (refs/main, a Llama) and at V2 (refs/v2, a GPT-2)."""
    hub = HubCache(Path(home))
    for commit, kind, ref in ((MAIN, "llama", "main"), (V2, "gpt2", BRANCH)):
        _add_snapshot(hub, commit, kind)
        refs = hub.snapshot(commit).parents[1] / "refs"
        refs.mkdir(parents=True, exist_ok=True)
        (refs / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return hub


def _add_snapshot(hub: HubCache, commit: str, kind: str) -> None:
    """Save a tiny model, then move each file into blobs/ and link it from snapshots/<commit>/, as the hub does."""
    staging = hub.home / f"staging-{commit[:8]}"
    _hf_models.save_tiny(kind, staging)
    snapshot = hub.snapshot(commit)
    blobs = snapshot.parents[1] / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(staging.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = blobs / digest
        if not blob.exists():
            shutil.move(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    shutil.rmtree(staging)
