"""A base model's fingerprint, as an adapter records it (`lorakit.json`) and a load checks it.

Every tensor the base's forward reads is hashed whole (`files.provenance.weight_hash`): parameters and
persistent buffers of every module (embeddings, norms, biases, every projection, the head), a tied tensor
once under its first name. The weights the adapter wraps are recorded per module (`modules`), each taken as
it was before anything changed it:

    a plain or wrapped layer    its weight (while merged in place: the exact weight `merge_` set aside)
    PiSSA / OLoRA               the weight before the init left the residual in the base (recorded then)
    a quantised base (QLoRA)    the full-precision weight it was quantised from (recorded then), so an adapter
                                trained on an NF4/int8 copy matches the bf16 base; where that is unknown,
                                the dequantised weight, marked so

and every other tensor by its name in the plain base (`tensors`; a LoRA layer's `.base` and a trained copy's
`.original` left out of the name), but those the adapter itself writes when it loads (its trained biases,
modules_to_save, whole embedding weights: `peft_format.replaced_base_tensors`), which its own hashes cover.
Beside them, every `model.config` field that changes the computation (`CONFIG_IGNORED` lists those that do not).

The hashes are kept by the caller in a `Fingerprints` (one per base model: `serve`, the trainer and `eval` hold
one), each until its tensor changes (`cache.TensorCache`), so a hot swap onto one base hashes it once; without
one, each call hashes the base again (about 0.6 s per billion fp32 parameters on one thread).
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import bases
from .cache import TensorCache
from .errors import LoraBaseMismatch, ProvenanceNote
from .files import peft_format, provenance
from .files.peft_format import AdapterFile
from .layers import LoraLayer, base_of
from .param_layers import LoraParam
from .trained_copy import TrainedCopy

# format-1 sidecars recorded these model.config fields only
LEGACY_CONFIG_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
# model.config fields that do not change what the base computes (names, versions, the weights' dtype, which the
# hash makes no difference of, token ids and switches for generation or outputs, dropout, init, the task head)
CONFIG_IGNORED = frozenset(
    {
        "_name_or_path", "name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype",
        "_attn_implementation", "_attn_implementation_internal", "attn_implementation", "_commit_hash",
        "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "task_specific_params",
        "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id", "tokenizer_class",
        "use_cache", "output_attentions", "output_hidden_states", "return_dict", "torchscript", "use_return_dict",
        "initializer_range", "initializer_factor", "chunk_size_feed_forward", "prefix", "auto_map",
    }
)  # fmt: skip
MAX_THREADS = 8  # threads hashing a base's tensors the first time (at most torch.get_num_threads())


class Fingerprints:
    """What a caller keeps beside one base model so that checking adapters against it hashes it once: each base
    tensor's record until that tensor changes, the adapter files already verified (by their stamp), and the
    records taken before FSDP2 sharded the weights (`remember_before_sharding`).

    Examples:
        >>> fp, model = Fingerprints(), nn.Sequential(nn.Linear(2, 2))
        >>> base_fingerprint(model, ["0"], fp) == base_fingerprint(model, ["0"], fp)
        True
    """

    def __init__(self) -> None:
        self.records: dict[str, TensorCache[dict[str, Any]]] = {}
        self.verified: dict[str, tuple[int, ...]] = {}  # weights file -> the stamp its tensors were verified at
        self.before_sharding: dict[str, dict[str, Any]] = {}  # tensor or module name -> its record

    def record(self, name: str, tensor: Tensor, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The record of `tensor` (called `name`), computed again only when that tensor changed."""
        if _is_sharded(tensor):  # FSDP2: this rank holds a shard; the whole was fingerprinted before sharding
            return dict(self.before_sharding.get(name) or {**_shape(tensor), "sharded": True})
        cache = self.records.setdefault(name, TensorCache())
        return dict(cache.get([tensor], compute))


def module_fingerprint(module: nn.Module, name: str = "", fingerprints: Fingerprints | None = None) -> dict[str, Any]:
    """{"xxh3", "shape", "dtype"[, "quantized", "source"]} of a targeted module's frozen base weight."""
    fp = fingerprints or Fingerprints()
    layer = module if isinstance(module, LoraLayer) else None
    base = base_of(module)
    recorded = _init_source(layer)
    if recorded is not None:  # PiSSA/OLoRA left a residual in the base
        return dict(recorded)
    if isinstance(base, bases.QuantizedBase):
        if base.source_fingerprint is not None:
            return {**base.source_fingerprint, "quantized": base.format}
        w = bases.dense_weight(base)
        return {**provenance.weight_record(w), "quantized": base.format, "source": "dequantized"}
    if layer is not None and layer.merged:
        unmerged = layer._unmerged_weight  # the exact base weight merge_ set aside
        assert unmerged is not None, "merge_ sets the base weight aside"
        return fp.record(name, unmerged, lambda: provenance.weight_record(unmerged))
    w = bases.weight(base)
    return fp.record(name, w, lambda: provenance.weight_record(w))


def _init_source(layer: LoraLayer | None) -> dict[str, Any] | None:
    """The record of the weight a PiSSA/OLoRA init replaced by its residual, None where no such init ran."""
    return layer.base_init.source_fingerprint if layer is not None and layer.base_init is not None else None


def remember_before_sharding(model: nn.Module, fingerprints: Fingerprints) -> None:
    """Fingerprint every base tensor now, into `fingerprints`, for saves after FSDP2 shards the weights.

    Once sharded, each rank holds part of every weight and a save (on one rank) cannot hash the whole: without
    this record such a save writes the shapes and dtypes only, and loads cannot check the values.
    """
    from .model import lora_layers

    for name, get in _entries(model, set()).items():
        fingerprints.before_sharding[name] = get(fingerprints)
    for name, layer in lora_layers(model).items():  # a targeted module's weight: under the module's name too
        if not isinstance(layer, LoraParam):  # a LoraParam's parameter is among the entries, by its path
            fingerprints.before_sharding[name] = module_fingerprint(layer, name, fingerprints)


def _is_sharded(w: Tensor) -> bool:
    """Whether `w` is a DTensor (FSDP2's sharded parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(w, DTensor)


def _shape(w: Tensor) -> dict[str, Any]:
    return {"shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch.")}


def _tensor_record(t: Tensor, name: str, fp: Fingerprints) -> dict[str, Any]:
    """A plain base tensor's record, through the caller's cache."""
    return fp.record(name, t, lambda: provenance.weight_record(t))


def _walk(module: nn.Module, prefix: str, seen: set[int]) -> Iterator[tuple[str, nn.Module]]:
    """(plain name, module) of every module holding base tensors: a LoRA layer stands for its base, a trained copy
    for its original; neither is entered (a LoRA layer's adapters are not the base)."""
    if id(module) in seen:
        return
    seen.add(id(module))
    if isinstance(module, TrainedCopy):
        yield from _walk(module.original, prefix, seen)
        return
    yield prefix, module
    if isinstance(module, LoraParam):  # its owner's submodules hold base tensors too
        module = module.owner
    elif isinstance(module, LoraLayer):
        return
    for child_name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{prefix}.{child_name}" if prefix else child_name, seen)


def _entries(model: nn.Module, skip: set[str]) -> dict[str, Callable[[Fingerprints], dict[str, Any]]]:
    """How to fingerprint each base tensor, by name (a module's name for a weight LoRA wraps): every parameter and
    persistent buffer the forward reads, once each, but the names in `skip`."""
    out: dict[str, Callable[[Fingerprints], dict[str, Any]]] = {}
    seen: set[int] = set()
    for prefix, module in _walk(model, "", set()):
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, LoraParam):  # every tensor of its owner by its own path, an adapted one as before
            out.update(_param_entries(module, dot, skip, seen))
            continue
        if isinstance(module, LoraLayer) or bases.is_quantized(module):  # its weight as before lorakit changed it
            base = base_of(module)
            name, w = dot + "weight", getattr(base, "weight", None)
            if name not in skip and not (isinstance(w, Tensor) and id(w) in seen):
                seen.add(id(w))
                out[name] = functools.partial(module_fingerprint, module, name)
            tensors = {"bias": b} if (b := bases.own_bias(base)) is not None else {}
        else:
            persistent = {k: b for k, b in module._buffers.items() if k not in module._non_persistent_buffers_set}
            tensors = {**module._parameters, **persistent}  # type: ignore[dict-item]
        for key, t in tensors.items():
            name = dot + key
            if t is None or id(t) in seen or name in skip or t.device.type == "meta":
                continue
            seen.add(id(t))
            out[name] = functools.partial(_tensor_record, t, name)
    return out


def _param_entries(
    layer: LoraParam, dot: str, skip: set[str], seen: set[int]
) -> dict[str, Callable[[Fingerprints], dict[str, Any]]]:
    """`_entries` of a LoraParam's owner: each parameter and persistent buffer under `dot` + its name, an adapted
    parameter merged in place by the weight `merge_` set aside (as it was before lorakit changed it)."""
    owner = layer.owner
    out: dict[str, Callable[[Fingerprints], dict[str, Any]]] = {}
    adapted = {x.param_name: x for x in layer.chain()}
    persistent = {k: b for k, b in owner._buffers.items() if k not in owner._non_persistent_buffers_set}
    for key, t in {**owner._parameters, **persistent}.items():
        name = dot + key
        if t is None or id(t) in seen or name in skip or t.device.type == "meta":
            continue
        seen.add(id(t))
        held = adapted.get(key)
        if held is not None and held.merged and held._unmerged_weight is not None:
            t = held._unmerged_weight
        out[name] = functools.partial(_tensor_record, t, name)
    return out


def base_fingerprint(
    model: nn.Module,
    modules: Iterable[str],
    fingerprints: Fingerprints | None = None,
    *,
    skip: Iterable[str] = (),
) -> dict[str, Any]:
    """The fingerprint of `model` as a base for LoRA on `modules` (names absent from the model are left out): those
    modules' weights, every other base tensor but `skip` (names of tensors the adapter itself writes), the config.

    Examples:
        >>> fp = base_fingerprint(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), ["0"])
        >>> sorted(fp["modules"]["0"]), sorted(fp["tensors"])
        (['dtype', 'shape', 'xxh3'], ['0.bias', '1.bias', '1.weight'])
    """
    fp = fingerprints or Fingerprints()
    targeted = list(modules)
    wanted = {f"{m}.weight" for m in targeted} | set(skip)  # a targeted weight is its module's record
    entries = _entries(model, wanted)
    for m in targeted:
        if m not in entries and (found := _submodule(model, m)) is not None:
            entries[m] = functools.partial(module_fingerprint, found, m)
    first = not all(n in fp.records for n in entries)
    workers = min(len(entries), torch.get_num_threads(), MAX_THREADS)
    if first and workers > 1:  # hashing and torch's casts release the GIL
        with ThreadPoolExecutor(workers) as pool:
            records = dict(zip(entries, pool.map(lambda get: get(fp), entries.values()), strict=True))
    else:
        records = {n: get(fp) for n, get in entries.items()}
    cfg = getattr(model, "config", None)
    out: dict[str, Any] = {
        "modules": {m: records[m] for m in targeted if m in records},
        "tensors": {n: r for n, r in records.items() if n not in targeted},
        "config": config_fields(cfg),
        "class": type(model).__name__,
    }
    path = getattr(cfg, "name_or_path", None)
    if isinstance(path, str) and path and Path(path).is_dir():
        out["path"] = str(Path(path).resolve())
        if (Path(path) / "config.json").is_file():
            out["config_sha256"] = provenance.file_digest(Path(path) / "config.json")
    return out


def config_fields(cfg: Any) -> dict[str, Any]:
    """The fields of a model config that change the computation (JSON values), {} for a model without one."""
    to_dict = getattr(cfg, "to_dict", None)
    if not callable(to_dict):
        return {}
    fields = {k: v for k, v in to_dict().items() if k not in CONFIG_IGNORED and not _is_dropout(k)}
    return json.loads(json.dumps(fields, sort_keys=True, default=str))  # as the sidecar stores them


def _is_dropout(field: str) -> bool:
    """A dropout rate: it changes training only, never what an evaluated base computes."""
    return "dropout" in field or field.endswith("_pdrop")


def _legacy_fingerprint(model: nn.Module, modules: Iterable[str]) -> dict[str, Any]:
    """A format-1 fingerprint (sha256 of the targeted weights, seven config fields), to check an older sidecar."""
    records = {}
    for m in modules:
        found = _submodule(model, m)
        if found is None:
            continue
        layer = found if isinstance(found, LoraLayer) else None
        base = base_of(found)
        if _init_source(layer) or bases.is_quantized(base):
            records[m] = {k: v for k, v in module_fingerprint(found).items() if k != provenance.HASH}  # shape only
            continue
        w = layer._unmerged_weight if layer is not None and layer.merged else bases.weight(base)
        assert w is not None, "merge_ sets the base weight aside"
        records[m] = provenance.weight_record(w, legacy=True)
    cfg = getattr(model, "config", None)
    config = {f: v for f in LEGACY_CONFIG_FIELDS if isinstance(v := getattr(cfg, f, None), (int, float, str))}
    return {"modules": records, "config": config}


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    """The module called `name`, None where the model has none (a path walk, not a walk of the whole model)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def check_base(
    model: nn.Module, file: AdapterFile, *, allow_mismatch: bool = False, fingerprints: Fingerprints | None = None
) -> None:
    """Check `file` against `model` before it loads: its config and tensors unchanged since saving, its base this one.

    LoraFileChanged if a computation field of adapter_config.json or a tensor differs from what lorakit.json
    recorded; LoraBaseMismatch naming the modules, tensors and config fields that differ (a ProvenanceNote warning
    instead with `allow_mismatch`); a ProvenanceNote where the adapter has no sidecar (its base cannot be checked),
    has an older one (it covers less), or was trained on a quantised copy of this base.
    """
    fp = fingerprints or Fingerprints()
    directory = Path(file.config_path).parent
    sidecar = file.sidecar
    if sidecar is None:
        warnings.warn(
            f"{directory}: no {provenance.SIDECAR_NAME} (a PEFT-made or older adapter): its base could not be checked",
            ProvenanceNote,
            stacklevel=3,
        )
        return
    provenance.check_config(sidecar, peft_format.computation_fields(file.spec.raw), file.config_path)
    if file.stamp is None or fp.verified.get(file.where) != file.stamp:  # a hot swap of a verified file: skipped
        provenance.check_unchanged(sidecar, file.tensors, file.where)
        if file.stamp is not None:
            fp.verified[file.where] = file.stamp
    saved = sidecar.base
    if sidecar.format == provenance.LEGACY_FORMAT:
        warnings.warn(
            f"{sidecar.path}: written by an older lorakit, it covers only the targeted weights and 7 config "
            "fields, not the rest of the base nor adapter_config.json; save the adapter again to cover them",
            ProvenanceNote,
            stacklevel=3,
        )
    _report(model, directory, saved, provenance.compare(saved, fingerprint_like(model, sidecar, fp)), allow_mismatch)


def fingerprint_like(
    model: nn.Module, sidecar: provenance.Sidecar, fingerprints: Fingerprints | None = None
) -> dict[str, Any]:
    """The fingerprint of `model` that `sidecar`'s recorded base compares with: of its format, over its modules,
    without the base tensors the adapter writes itself (its tensor keys say which)."""
    if sidecar.format == provenance.LEGACY_FORMAT:
        return _legacy_fingerprint(model, sidecar.base["modules"])
    skip = peft_format.replaced_base_tensors(sidecar.tensors)
    return base_fingerprint(model, sidecar.base["modules"], fingerprints, skip=skip)


def _report(model: nn.Module, directory: Path, saved: dict[str, Any], differences: list[str], allow: bool) -> None:
    """Refuse (or, allowed, warn about) a base that differs; note a QLoRA adapter onto its full-precision source."""
    if differences:
        shown = "; ".join(differences[:4]) + (f"; ... ({len(differences)} in all)" if len(differences) > 4 else "")
        where = f" ({saved['path']})" if saved.get("path") else ""
        message = f"{directory}: this adapter was saved for a different base{where}: {shown}"
        if not allow:
            raise LoraBaseMismatch(message, differences)
        warnings.warn(f"{message}; loading it anyway (allow_base_mismatch)", ProvenanceNote, stacklevel=4)
        return
    quantized = sorted({m["quantized"] for m in saved["modules"].values() if "quantized" in m})
    if quantized and not any(bases.is_quantized(base_of(model.get_submodule(n))) for n in saved["modules"]):
        warnings.warn(
            f"{directory}: trained on a {'/'.join(quantized)}-quantised copy of this base; loading it onto the "
            "full-precision weights that copy was made from",
            ProvenanceNote,
            stacklevel=4,
        )
