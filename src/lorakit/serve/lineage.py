"""What GET /v1/models says of an adapter's lineage: the base its `lorakit.json` records, its tensors' hash, and
whether that base is the one this server serves.

    "lineage": {"base_fingerprint": "3f0c9a...",        # provenance.fingerprint_id of the base the sidecar records
                "base_class": "LlamaForCausalLM",        # as recorded at save time (None: not recorded)
                "base_path": "/models/llama",            # as recorded at save time (None: not recorded)
                "adapter_hash": "9ab14e...",             # one digest of the adapter's tensor hashes as saved
                "base_match": true,                      # false: saved for another base; null: no sidecar
                "differences": []}                       # with false: how the bases differ, as a load says it

The comparison is the one a load makes (`fingerprint.fingerprint_like`, then `provenance.compare`), on the served
model with the server's `Fingerprints`: each base tensor is hashed once for the server's life (by the first
adapter load that checks it), and describing an adapter after its load finds every hash already kept. A
PEFT-made adapter (no sidecar) says nothing about its base: its `base_match` is null, its other fields too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..files import provenance
from ..fingerprint import Fingerprints, fingerprint_like

if TYPE_CHECKING:
    from torch import nn

MAX_DIFFERENCES = 4  # lines of `differences` shown; the count of the rest follows them


def adapter_hash(tensors: dict[str, str]) -> str:
    """A short digest of an adapter's tensor hashes (key -> sha256, as its sidecar records them).

    Examples:
        >>> adapter_hash({"a": "00", "b": "11"}) == adapter_hash({"b": "11", "a": "00"}) != adapter_hash({"a": "01"})
        True
    """
    return hashlib.sha256(json.dumps(sorted(tensors.items())).encode()).hexdigest()[:16]


def describe(model: nn.Module, directory: str | Path, fingerprints: Fingerprints | None = None) -> dict[str, Any]:
    """The lineage of the adapter in `directory`, against `model` (the served base, the adapter loaded or not).

    Args:
        model: the model the adapter is served on.
        directory: the adapter's directory (its `lorakit.json`, if any).
        fingerprints: the server's hashes of `model` (kept across calls); None hashes the base again.

    Returns:
        The `lineage` object of the adapter's card in GET /v1/models (see the module's docstring).

    Examples:
        >>> import tempfile, torch.nn as nn
        >>> describe(nn.Linear(2, 2), tempfile.mkdtemp())["base_match"] is None  # no sidecar: nothing to check
        True
    """
    sidecar = provenance.read(directory)
    if sidecar is None:
        return {
            "base_fingerprint": None,
            "base_class": None,
            "base_path": None,
            "adapter_hash": None,
            "base_match": None,
            "differences": [],
        }
    differences = provenance.compare(sidecar.base, fingerprint_like(model, sidecar, fingerprints))
    shown = differences[:MAX_DIFFERENCES]
    if len(differences) > MAX_DIFFERENCES:
        shown.append(f"... ({len(differences)} in all)")
    return {
        "base_fingerprint": provenance.fingerprint_id(sidecar.base),
        "base_class": sidecar.base.get("class"),
        "base_path": sidecar.base.get("path"),
        "adapter_hash": adapter_hash(sidecar.tensors),
        "base_match": not differences,
        "differences": shown,
    }
