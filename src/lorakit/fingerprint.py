"""A base model's fingerprint, as an adapter records it (`lorakit.json`) and a load checks it.

Per targeted module, the hash of the frozen base weight the LoRA layer wraps (`files.provenance.weight_digest`:
its bf16 bytes), taken from the weight as it was before anything changed it:

    a plain or wrapped layer    its weight (while merged in place: the exact weight `merge_` set aside)
    PiSSA / OLoRA               the weight before the init left the residual in the base (recorded then)
    a quantised base (QLoRA)    the full-precision weight it was quantised from (recorded then), so an adapter
                                trained on an NF4/int8 copy matches the bf16 base; where that is unknown,
                                the dequantised weight, marked so

plus the architecture fields of `model.config`. Hashes are cached on the module that holds the weight
(`cache.TensorCache`: recomputed when the tensor changes), so hot swaps onto one base hash it once.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from . import bases
from .cache import TensorCache
from .errors import LoraBaseMismatch, ProvenanceNote
from .files import provenance
from .files.peft_format import AdapterFile
from .layers import LoraLayer

# model.config fields that fix the architecture; a difference in any is a different base
CONFIG_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
MAX_THREADS = 8  # threads hashing a base's weights the first time
_CACHE = "_lorakit_fingerprint"  # the attribute holding a module's TensorCache of its weight's record
_SHARDED = "_lorakit_fingerprint_before_sharding"  # the record remember_before_sharding keeps on a base module
_VERIFIED = "_lorakit_verified_files"  # on a model: {weights file: the stamp its tensors were verified at}


def module_fingerprint(module: nn.Module) -> dict[str, Any]:
    """{"sha256", "shape", "dtype"[, "quantized", "source"]} of a targeted module's frozen base weight."""
    layer = module if isinstance(module, LoraLayer) else None
    base = layer.base if layer is not None else module
    recorded = getattr(layer.base_init, "source_fingerprint", None) if layer is not None else None
    if recorded is not None:  # PiSSA/OLoRA left a residual in the base
        return dict(recorded)
    if bases.is_quantized(base):
        fmt = str(getattr(base, "format", type(base).__name__))
        source = getattr(base, "source_fingerprint", None)
        if source is not None:
            return {**source, "quantized": fmt}
        w = bases.dense_weight(base)
        return {**_cached(base, w), "quantized": fmt, "source": "dequantized"}
    if layer is not None and layer.merged:
        unmerged = layer._unmerged_weight  # the exact base weight merge_ set aside
        assert unmerged is not None, "merge_ sets the base weight aside"
        return _cached(base, unmerged)
    w = bases.weight(base)
    if _is_sharded(w):  # FSDP2: this rank holds a shard; the whole weight was fingerprinted before sharding
        return dict(base.__dict__.get(_SHARDED) or {"shape": list(w.shape), "dtype": _dtype(w), "sharded": True})
    return _cached(base, w)


def _check_unchanged(model: nn.Module, file: AdapterFile, sidecar: provenance.Sidecar) -> None:
    """provenance.check_unchanged, once per file as it is on disk: a hot swap re-reading the file this model
    already verified (same device, inode, size and modification time) skips re-hashing its tensors. The record
    lives on the model (no process-wide state); any rewrite, copy or edit of the file changes the stamp."""
    verified: dict[str, tuple[int, ...]] = model.__dict__.setdefault(_VERIFIED, {})
    if file.stamp is not None and verified.get(file.where) == file.stamp:
        return
    provenance.check_unchanged(sidecar, file.tensors, file.where)
    if file.stamp is not None:
        verified[file.where] = file.stamp


def remember_before_sharding(model: nn.Module) -> None:
    """Fingerprint each LoRA layer's base weight now, on its module, for saves after FSDP2 shards the weights.

    Once sharded, each rank holds part of every weight and a save (on one rank) cannot hash the whole: without
    this record such a save writes the shape and dtype only, and loads cannot check the values.
    """
    from .model import lora_layers

    for layer in lora_layers(model).values():
        layer.base.__dict__[_SHARDED] = module_fingerprint(layer)


def _is_sharded(w: Tensor) -> bool:
    """Whether `w` is a DTensor (FSDP2's sharded parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(w, DTensor)


def _dtype(w: Tensor) -> str:
    return str(w.dtype).removeprefix("torch.")


def _cached(holder: nn.Module, w: Tensor) -> dict[str, Any]:
    """The weight's record, cached on the module that holds it until the tensor changes."""
    cache = holder.__dict__.get(_CACHE)
    if cache is None:
        cache = TensorCache()
        holder.__dict__[_CACHE] = cache
    return dict(cache.get([w], lambda: provenance.weight_record(w)))


def base_fingerprint(model: nn.Module, modules: Iterable[str]) -> dict[str, Any]:
    """The fingerprint of `model` as a base for LoRA on `modules` (names absent from the model are left out).

    Examples:
        >>> import torch
        >>> fp = base_fingerprint(nn.Sequential(nn.Linear(2, 2)), ["0"])
        >>> sorted(fp["modules"]["0"])
        ['dtype', 'sha256', 'shape']
    """
    found = {n: m for n in modules if (m := _submodule(model, n)) is not None}
    workers = min(len(found), os.cpu_count() or 1, MAX_THREADS)
    if workers > 1 and not all(_CACHE in _plain_of(m).__dict__ for m in found.values()):  # a first hash: threads
        with ThreadPoolExecutor(workers) as pool:  # hashlib and torch's casts release the GIL
            records = list(pool.map(module_fingerprint, found.values()))
    else:
        records = [module_fingerprint(m) for m in found.values()]
    cfg = getattr(model, "config", None)
    out: dict[str, Any] = {
        "modules": dict(zip(found, records, strict=True)),
        "config": {f: v for f in CONFIG_FIELDS if isinstance(v := getattr(cfg, f, None), (int, float, str))},
        "class": type(model).__name__,
    }
    path = getattr(cfg, "name_or_path", None)
    if isinstance(path, str) and path and Path(path).is_dir():
        out["path"] = str(Path(path).resolve())
        if (Path(path) / "config.json").is_file():
            out["config_sha256"] = provenance.file_digest(Path(path) / "config.json")
    return out


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    """The module called `name`, None where the model has none (a path walk, not a walk of the whole model)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def check_base(model: nn.Module, file: AdapterFile, *, allow_mismatch: bool = False) -> None:
    """Check `file` against `model` before it loads: its tensors unchanged since saving, its base this one.

    LoraFileChanged if the tensors differ from the recorded hashes; LoraBaseMismatch naming the modules that
    differ (a ProvenanceNote warning instead with `allow_mismatch`); a ProvenanceNote where the adapter has no
    sidecar (its base cannot be checked) or was trained on a quantised copy of this base.
    """
    directory = Path(file.config_path).parent
    sidecar = file.sidecar
    if sidecar is None:
        warnings.warn(
            f"{directory}: no {provenance.SIDECAR_NAME} (a PEFT-made or older adapter): its base could not be checked",
            ProvenanceNote,
            stacklevel=3,
        )
        return
    _check_unchanged(model, file, sidecar)
    saved = sidecar.base
    differences = provenance.compare(saved, base_fingerprint(model, saved["modules"]))
    if differences:
        shown = "; ".join(differences[:4]) + (f"; ... ({len(differences)} in all)" if len(differences) > 4 else "")
        where = f" ({saved['path']})" if saved.get("path") else ""
        message = f"{directory}: this adapter was saved for a different base{where}: {shown}"
        if not allow_mismatch:
            raise LoraBaseMismatch(
                f"{message}; load it onto the base it was trained on, or pass allow_base_mismatch=True "
                "to load it anyway",
                differences,
            )
        warnings.warn(f"{message}; loading it anyway (allow_base_mismatch)", ProvenanceNote, stacklevel=3)
        return
    quantized = sorted({m["quantized"] for m in saved["modules"].values() if "quantized" in m})
    if quantized and not any(bases.is_quantized(_plain(model, n)) for n in saved["modules"]):
        warnings.warn(
            f"{directory}: trained on a {'/'.join(quantized)}-quantised copy of this base; loading it onto the "
            "full-precision weights that copy was made from",
            ProvenanceNote,
            stacklevel=3,
        )


def _plain(model: nn.Module, module: str) -> nn.Module:
    """The plain base module at `module` (a LoRA layer's base)."""
    return _plain_of(model.get_submodule(module))


def _plain_of(module: nn.Module) -> nn.Module:
    """A LoRA layer's base, or the module itself: the module that holds the weight (and its cached hash)."""
    return module.base if isinstance(module, LoraLayer) else module
