"""lorakit's sidecar beside an adapter (`lorakit.json`): which base it was saved for, the adapter config it was
saved with, and its tensors' hashes.

PEFT's `adapter_config.json` records only `base_model_name_or_path`, whatever path was typed. The sidecar,
written in the same locked save as the adapter's two files, adds what a load can check:

    {"format": 2,
     "base": {"modules": {name: {"xxh3", "shape", "dtype"[, "quantized", "source"]}},  # each targeted weight
              "tensors": {name: {"xxh3", "shape", "dtype"}},  # every other tensor of the base's forward
              "config": {...},                        # model.config's fields that change the computation
              "class": "LlamaForCausalLM", "path": "/abs/base", "config_sha256": "..."},   # for people
     "adapter_config": {...},                         # adapter_config.json's fields that change the computation
     "tensors": {key: sha256}}                        # the adapter's tensors as saved

A base tensor is hashed whole, every byte, as its bf16 bytes for a floating tensor (`weight_hash`: an fp32
base and the same weights loaded in bf16 share a fingerprint) with xxh3-128, a non-cryptographic hash at
memory speed: the fingerprint tells bases apart, it is no defence against a base forged to collide. The
adapter's own tensors are hashed exactly (dtype, shape and bytes) with sha256. Format 1 sidecars (older
lorakit: sha256 of the targeted weights only, seven config fields, no adapter config) are still read and
checked for what they cover. This module reads and writes the file and compares records;
`lorakit.fingerprint` fingerprints a model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import Tensor

from ..errors import LoraFileChanged, LoraFileError
from .atomic import write_json

SIDECAR_NAME = "lorakit.json"
FORMAT = 2
LEGACY_FORMAT = 1  # targeted weights only (sha256), seven config fields, no adapter config: still checked
HASH, LEGACY_HASH = "xxh3", "sha256"  # the key of a base tensor's digest in a record, by format
CANONICAL = torch.bfloat16  # the dtype a floating base tensor is hashed in
CHUNK = 1 << 20  # elements converted to bf16 at a time: the buffer stays in cache, the tensor is read once
MAX_SIDECAR_BYTES = 16 * 1024 * 1024


def weight_hash(t: Tensor) -> str:
    """xxh3-128 of every byte of a tensor in C order: a floating one as bf16 (equal for the same weights in fp32
    or bf16), converted a chunk at a time into one small buffer; any other dtype as stored.

    Examples:
        >>> w = torch.arange(6.0).reshape(2, 3)
        >>> weight_hash(w) == weight_hash(w.to(torch.bfloat16)) != weight_hash(w + 1)
        True
    """
    flat = t.detach().reshape(-1)
    h = xxhash.xxh3_128()
    if not flat.is_floating_point() or (flat.dtype == CANONICAL and flat.device.type == "cpu"):
        h.update(flat.contiguous().view(torch.uint8).numpy())  # type: ignore[arg-type]
        return h.hexdigest()
    buf = torch.empty(min(CHUNK, flat.numel()), dtype=CANONICAL)
    for i in range(0, flat.numel(), CHUNK):
        part = flat[i : i + CHUNK]
        out = buf[: part.numel()]
        out.copy_(part)  # rounds to nearest even, as .to(torch.bfloat16) does
        h.update(out.view(torch.uint8).numpy())  # type: ignore[arg-type]
    return h.hexdigest()


def weight_digest(weight: Tensor) -> str:
    """sha256 of a weight's values as bf16 bytes (C order), as format-1 sidecars record a targeted weight.

    Examples:
        >>> w = torch.arange(6.0).reshape(2, 3)
        >>> weight_digest(w) == weight_digest(w.to(torch.bfloat16))
        True
    """
    w = weight.detach().to(device="cpu", dtype=CANONICAL).contiguous()
    return hashlib.sha256(w.reshape(-1).view(torch.uint8).numpy()).hexdigest()  # type: ignore[arg-type]


def weight_record(weight: Tensor, *, legacy: bool = False) -> dict[str, Any]:
    """A base tensor's entry in a fingerprint: its `weight_hash` (`weight_digest` for a format-1 check), shape (as
    stored) and dtype."""
    digest = {LEGACY_HASH: weight_digest(weight)} if legacy else {HASH: weight_hash(weight)}
    return {**digest, "shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch.")}


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
    """A read sidecar: the base fingerprint recorded at save time, the adapter config's computation fields
    (None in a format-1 sidecar, which has none) and the adapter's tensor hashes."""

    base: dict[str, Any]
    tensors: dict[str, str]
    path: str  # the sidecar file, for messages
    format: int = FORMAT
    adapter_config: dict[str, Any] | None = None


def write(
    directory: str | Path, base: Mapping[str, Any], tensors: Mapping[str, Tensor], adapter_config: Mapping[str, Any]
) -> None:
    """Write the sidecar for an adapter saved with `tensors` (PEFT keys) and `adapter_config` (the computation
    fields of its adapter_config.json) onto a base fingerprinted as `base`."""
    digests = {key: tensor_digest(t) for key, t in sorted(tensors.items())}
    write_json(
        Path(directory) / SIDECAR_NAME,
        {"format": FORMAT, "base": dict(base), "adapter_config": dict(adapter_config), "tensors": digests},
    )


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
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or fmt not in (FORMAT, LEGACY_FORMAT):
        got = fmt if isinstance(raw, dict) else type(raw).__name__
        raise LoraFileError(f"{path}: format {got!r} is not a lorakit sidecar format ({LEGACY_FORMAT} or {FORMAT})")
    digest = HASH if fmt == FORMAT else LEGACY_HASH
    base, tensors, config = raw.get("base"), raw.get("tensors"), raw.get("adapter_config")
    modules = base.get("modules") if isinstance(base, dict) else None
    if not isinstance(modules, dict) or not all(_is_record(m, digest) for m in modules.values()):
        raise LoraFileError(f"{path}: key 'base' must hold 'modules', each with its weight's {digest!r}")
    assert isinstance(base, dict), "modules came from it"
    if fmt == FORMAT:
        others = base.get("tensors")
        if not isinstance(others, dict) or not all(_is_record(m, digest) for m in others.values()):
            raise LoraFileError(f"{path}: key 'base' must hold 'tensors', each with its {digest!r}")
        if not isinstance(config, dict):
            raise LoraFileError(f"{path}: key 'adapter_config' must be an object (the adapter's computation fields)")
    if not isinstance(tensors, dict) or not all(isinstance(v, str) for v in tensors.values()):
        raise LoraFileError(f"{path}: key 'tensors' must map each tensor key to its sha256")
    return Sidecar(base, tensors, str(path), fmt, config if fmt == FORMAT else None)


def _is_record(m: Any, digest: str) -> bool:
    """Whether `m` is a base tensor's record: its digest, or a shape alone (a weight saved sharded, unhashed)."""
    return isinstance(m, dict) and (digest in m or m.get("sharded") is True)


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


def check_config(sidecar: Sidecar, fields: Mapping[str, Any], config_path: str) -> None:
    """LoraFileChanged naming each field of adapter_config.json that changes the computation and differs from what
    the sidecar recorded at save time (`fields`: those fields as the file holds them now, `peft_format`)."""
    if sidecar.adapter_config is None:  # format 1 recorded none
        return
    saved = sidecar.adapter_config
    changed = [
        f"{k} {saved.get(k)!r} saved, {fields.get(k)!r} now"
        for k in sorted(saved.keys() | fields.keys())
        if saved.get(k) != fields.get(k)
    ]
    if changed:
        raise LoraFileChanged(
            f"{config_path}: the adapter config changed since it was saved ({'; '.join(changed)}; {SIDECAR_NAME} "
            "records the fields that change what the adapter computes); restore it, or delete "
            f"{SIDECAR_NAME} to load it unchecked"
        )


def fingerprint_id(base: Mapping[str, Any]) -> str:
    """A short id of a base fingerprint (its hashes and config), to tell two bases apart at a glance."""
    digest = HASH if any(HASH in m for m in base["modules"].values()) or "tensors" in base else LEGACY_HASH
    records = {**base.get("tensors", {}), **base["modules"]}
    h = hashlib.sha256(
        json.dumps([base.get("config", {}), sorted((n, m.get(digest)) for n, m in records.items())]).encode()
    )
    return h.hexdigest()[:16]


def compare(saved: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """How the base fingerprint `here` differs from `saved`, one line per module, tensor or config field (none: a
    match). Config fields are compared where both record them (a transformers upgrade adds fields); tensors both
    ways (a tensor only one base has is a difference)."""
    out = []
    mine, theirs = saved.get("config", {}), here.get("config", {})
    legacy = "tensors" not in saved
    fields = (mine.keys() | theirs.keys()) if legacy else (mine.keys() & theirs.keys())
    for field in sorted(fields):
        if mine.get(field) != theirs.get(field):
            out.append(f"config {field}: {mine.get(field)!r} saved, {theirs.get(field)!r} here")
    for name, s in saved["modules"].items():
        out += _differs(repr(name), s, here["modules"].get(name))
    if not legacy:
        others = here.get("tensors", {})
        for name, s in saved["tensors"].items():
            out += _differs(f"tensor {name!r}", s, others.get(name))
        out += [f"tensor {name!r}: not in the saved base" for name in others if name not in saved["tensors"]]
    return out


def _differs(what: str, s: Mapping[str, Any], h: Mapping[str, Any] | None) -> list[str]:
    """How one tensor's record `h` here differs from `s` saved (none: a match, or nothing to compare)."""
    if h is None:
        return [f"{what}: not in this model"]
    if list(s.get("shape", ())) != list(h.get("shape", ())):
        return [f"{what}: weight shape {tuple(s['shape'])} saved, {tuple(h['shape'])} here"]
    digest = next((d for d in (HASH, LEGACY_HASH) if d in s and d in h), None)  # none: saved sharded, unhashed
    if digest is None or s[digest] == h[digest]:
        return []
    dtypes = f" (saved as {s.get('dtype')}, here {h.get('dtype')})" if s.get("dtype") != h.get("dtype") else ""
    source = " (saved from a quantised base whose source was unknown)" if s.get("source") == "dequantized" else ""
    return [f"{what}: weight values differ{dtypes}{source}"]
