"""lorakit's sidecar beside an adapter (`lorakit.json`): which base it was saved for, and its tensors' hashes.

PEFT's `adapter_config.json` records only `base_model_name_or_path`, whatever path was typed. The sidecar,
written in the same locked save as the adapter's two files, adds what a load can check:

    {"format": 1,
     "base": {"modules": {name: {"sha256", "shape", "dtype"[, "quantized", "source"]}},  # each targeted weight
              "config": {...},                        # architecture fields (model_type, hidden_size, ...)
              "class": "LlamaForCausalLM", "path": "/abs/base", "config_sha256": "..."},   # for people
     "tensors": {key: sha256}}                        # the adapter's tensors as saved

A weight is hashed as its bf16 bytes (`weight_digest`): an fp32 base and the same weights loaded in bf16 share
a fingerprint, and bf16 halves the bytes to hash. Tensors are hashed exactly (dtype, shape and bytes). This
module reads and writes the file and compares records; `lorakit.fingerprint` fingerprints a model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import LoraFileChanged, LoraFileError
from .atomic import write_json

SIDECAR_NAME = "lorakit.json"
FORMAT = 1
CANONICAL = torch.bfloat16  # the dtype a base weight is hashed in
MAX_SIDECAR_BYTES = 16 * 1024 * 1024


def weight_digest(weight: Tensor) -> str:
    """sha256 of a weight's values as bf16 bytes (C order): equal for the same weights in fp32 or bf16.

    Examples:
        >>> w = torch.arange(6.0).reshape(2, 3)
        >>> weight_digest(w) == weight_digest(w.to(torch.bfloat16))
        True
    """
    w = weight.detach().to(device="cpu", dtype=CANONICAL).contiguous()
    return hashlib.sha256(w.reshape(-1).view(torch.uint8).numpy()).hexdigest()  # type: ignore[arg-type]


def weight_record(weight: Tensor) -> dict[str, Any]:
    """A base weight's entry in a fingerprint: its `weight_digest`, shape (as stored) and dtype."""
    return {
        "sha256": weight_digest(weight),
        "shape": list(weight.shape),
        "dtype": str(weight.dtype).removeprefix("torch."),
    }


def tensor_digest(t: Tensor) -> str:
    """sha256 of a tensor exactly: its dtype, shape and bytes."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy())  # type: ignore[arg-type]
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Sidecar:
    """A read sidecar: the base fingerprint recorded at save time and the adapter's tensor hashes."""

    base: dict[str, Any]
    tensors: dict[str, str]
    path: str  # the sidecar file, for messages


def write(directory: str | Path, base: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
    """Write the sidecar for an adapter saved with `tensors` (PEFT keys) onto a base fingerprinted as `base`."""
    digests = {key: tensor_digest(t) for key, t in sorted(tensors.items())}
    write_json(Path(directory) / SIDECAR_NAME, {"format": FORMAT, "base": dict(base), "tensors": digests})


def read(directory: str | Path) -> Sidecar | None:
    """The sidecar of an adapter directory; None where it has none (a PEFT-made or older adapter)."""
    path = Path(directory) / SIDECAR_NAME
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_SIDECAR_BYTES:
        raise LoraFileError(f"{path}: {path.stat().st_size} bytes is past the {MAX_SIDECAR_BYTES}-byte limit")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LoraFileError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise LoraFileError(f"{path}: format {got!r} is not lorakit's sidecar format {FORMAT}")
    base, tensors = raw.get("base"), raw.get("tensors")
    modules = base.get("modules") if isinstance(base, dict) else None
    if not isinstance(modules, dict) or not all(isinstance(m, dict) and "sha256" in m for m in modules.values()):
        raise LoraFileError(f"{path}: key 'base' must hold 'modules', each with its weight's 'sha256'")
    if not isinstance(tensors, dict) or not all(isinstance(v, str) for v in tensors.values()):
        raise LoraFileError(f"{path}: key 'tensors' must map each tensor key to its sha256")
    assert isinstance(base, dict), "modules came from it"
    return Sidecar(base, tensors, str(path))


def check_unchanged(sidecar: Sidecar, tensors: Mapping[str, Tensor], where: str) -> None:
    """LoraFileChanged unless `tensors` (read from the file `where`) are the ones the sidecar recorded."""
    changed = [
        k for k in sorted(tensors.keys() & sidecar.tensors.keys()) if tensor_digest(tensors[k]) != sidecar.tensors[k]
    ]
    added, removed = sorted(tensors.keys() - sidecar.tensors.keys()), sorted(sidecar.tensors.keys() - tensors.keys())
    parts = [
        f"{what} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
        for what, keys in (("changed", changed), ("added", added), ("removed", removed))
        if keys
    ]
    if parts:
        raise LoraFileChanged(
            f"{where}: the adapter file changed since it was saved (its tensors differ from the hashes in "
            f"{sidecar.path}: {'; '.join(parts)}); restore it from a good copy, or delete {SIDECAR_NAME} "
            "to load it unchecked"
        )


def fingerprint_id(base: Mapping[str, Any]) -> str:
    """A short id of a base fingerprint (its module hashes and config), to tell two bases apart at a glance."""
    h = hashlib.sha256(
        json.dumps([base.get("config", {}), sorted((n, m["sha256"]) for n, m in base["modules"].items())]).encode()
    )
    return h.hexdigest()[:16]


def compare(saved: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """How the base fingerprint `here` differs from `saved`, one line per module or config field (none: a match)."""
    out = []
    for field in sorted(saved.get("config", {}).keys() | here.get("config", {}).keys()):
        a, b = saved.get("config", {}).get(field), here.get("config", {}).get(field)
        if a != b:
            out.append(f"config {field}: {a!r} saved, {b!r} here")
    for name, s in saved["modules"].items():
        h = here["modules"].get(name)
        if h is None:
            out.append(f"{name!r}: not in this model")
        elif list(s.get("shape", ())) != list(h.get("shape", ())):
            out.append(f"{name!r}: weight shape {tuple(s['shape'])} saved, {tuple(h['shape'])} here")
        elif "sha256" in s and "sha256" in h and s["sha256"] != h["sha256"]:  # none: saved sharded, unhashed
            dtypes = f" (saved as {s.get('dtype')}, here {h.get('dtype')})" if s.get("dtype") != h.get("dtype") else ""
            source = (
                " (saved from a quantised base whose source was unknown)" if s.get("source") == "dequantized" else ""
            )
            out.append(f"{name!r}: weight values differ{dtypes}{source}")
    return out
