"""What an adapter holds, without a model: config, targets, per-module shapes and ranks, sizes, base dims.

Works on lorakit- and PEFT-made directories, a bare `adapter_model.safetensors`, and lorakit layer files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import LoraFileError
from ..ui.tables import key_values, table, to_text
from . import peft_format
from . import safetensors as safetensors_io

MODEL_ADAPTER_KIND = "model adapter (PEFT layout)"  # describe()["kind"] of a directory or adapter_model file
_FACTORS = {"lora_A": "A", "lora_B": "B", "bias": "bias", "lora_magnitude": "magnitude"}  # per-module tensors


def describe(path: str | Path) -> dict[str, Any]:
    """A JSON-ready description of the adapter at `path` (directory or .safetensors file).

    Examples:
        >>> from torch import nn; import tempfile, lorakit as lk
        >>> m = lk.apply_lora(nn.Sequential(nn.Linear(4, 8)), lk.LoraConfig(rank=2), ["0"])
        >>> info = describe(lk.save_adapters(m, tempfile.mkdtemp()))
        >>> info["modules"][0]["base_weight_shape"], info["trainable_params"]
        ([8, 4], 24)
    """
    path = Path(path)
    directory: Path | None
    if path.is_dir():
        directory, weights = path, path / peft_format.WEIGHTS_NAME
    elif path.is_file():
        directory, weights = (path.parent if (path.parent / peft_format.CONFIG_NAME).is_file() else None), path
    else:
        raise LoraFileError(f"{path}: no such file or directory")
    if not weights.is_file():
        raise LoraFileError(
            f"{weights}: no such file "
            f"(an adapter directory holds {peft_format.CONFIG_NAME} and {peft_format.WEIGHTS_NAME})"
        )
    tensors, meta = safetensors_io.read(weights)
    if meta.get("format") == "lorakit-layer":
        return _describe_layer(weights, tensors, meta)

    info: dict[str, Any] = {
        "path": str(path),
        "kind": MODEL_ADAPTER_KIND,
        "weights_file": str(weights),
        "file_bytes": weights.stat().st_size,
        "config": None,
        "loadable": None,
        "problem": None,
    }
    spec = None
    if directory is not None:
        config_path = directory / peft_format.CONFIG_NAME
        try:
            info["config"] = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            info["problem"] = f"{config_path}: unreadable ({e})"
        try:
            spec = peft_format.read_adapter_config(directory)
            info["loadable"] = True
        except LoraFileError as e:
            info["loadable"], info["problem"] = False, str(e)
        info["file_bytes"] += config_path.stat().st_size if config_path.is_file() else 0
    fan_in_fan_out = bool(info["config"] and info["config"].get("fan_in_fan_out"))

    modules: dict[str, dict[str, Any]] = {}
    extra: list[dict[str, Any]] = []
    for key, t in tensors.items():
        hit = peft_format.split_key(key)
        if hit is None or hit[1] not in _FACTORS:  # modules_to_save, other biases, whole embeddings
            name = key.removeprefix(peft_format.PREFIX)
            extra.append(
                {
                    "name": name,
                    "shape": list(t.shape),
                    "params": t.numel(),
                    "dtype": str(t.dtype).removeprefix("torch."),
                }
            )
            continue
        module, tensor, layout = hit
        entry = modules.setdefault(module, {"module": module})
        entry[_FACTORS[tensor]] = list(t.shape)
        if tensor in ("lora_A", "lora_B"):  # bias keys are the same in every layout
            entry["dtype"] = str(t.dtype).removeprefix("torch.")
            entry["layout"] = layout
    rows = []
    for name, entry in modules.items():
        a, b = entry.get("A"), entry.get("B")
        if a is None or b is None:
            extra.append({"name": name, "problem": "has lora_A without lora_B (or the reverse)"})
            continue
        rank, d_out = a[0], b[0]
        d_in = a[1:]
        cfg = spec.config.for_module(name) if spec else None
        if entry.get("layout") == "embedding":  # A (r, num_embeddings), B (dim, r)
            base_shape, kind = [a[1], d_out], "embedding"
        elif len(a) > 2:  # conv: A (r, d_in, *k), B (d_out, r, 1...)
            base_shape, kind = [d_out, *d_in], f"conv{len(a) - 2}d"
        else:
            base_shape, kind = ([d_in[0], d_out] if fan_in_fan_out else [d_out, d_in[0]]), "linear"
        params = math.prod(a) + math.prod(b) + sum(math.prod(entry[k]) for k in ("bias", "magnitude") if k in entry)
        rows.append(
            {
                "module": name,
                "kind": kind,
                "lora_A": a,
                "lora_B": b,
                "rank": rank,
                "alpha": cfg.alpha if cfg else None,
                "scaling": cfg.scaling if cfg else None,
                "bias": "bias" in entry,
                "params": params,
                "dtype": entry.get("dtype"),
                "base_weight_shape": base_shape,
            }
        )
    info["modules"] = rows
    info["extra_tensors"] = extra  # modules_to_save (e.g. a classification head) and anything unrecognised
    info["lora_params"] = sum(r["params"] for r in rows)
    info["trainable_params"] = info["lora_params"] + sum(x.get("params", 0) for x in extra)
    info["ranks"] = sorted({r["rank"] for r in rows})
    if spec is not None:
        info["targets"] = spec.targets
        info["modules_to_save"] = spec.modules_to_save
    return info


def _describe_layer(path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> dict[str, Any]:
    """`describe` for a lorakit layer file: one module, the config from the metadata."""
    config = json.loads(meta.get("config", "{}"))
    a, b = list(tensors["lora_A"].shape), list(tensors["lora_B"].shape)
    params = sum(t.numel() for t in tensors.values())
    return {
        "path": str(path),
        "kind": f"lorakit layer adapter ({meta.get('layer')})",
        "weights_file": str(path),
        "file_bytes": path.stat().st_size,
        "config": config,
        "loadable": True,
        "problem": None,
        "modules": [
            {
                "module": "(layer)",
                "kind": meta.get("layer"),
                "lora_A": a,
                "lora_B": b,
                "rank": a[0],
                "alpha": config.get("alpha"),
                "scaling": None,
                "bias": "bias" in tensors,
                "params": params,
                "dtype": str(tensors["lora_A"].dtype).removeprefix("torch."),
                "base_weight_shape": json.loads(meta.get("base_weight_shape", "null")),
            }
        ],
        "extra_tensors": [],
        "lora_params": params,
        "trainable_params": params,
        "ranks": [a[0]],
    }


def render(info: dict[str, Any]) -> str:
    """The description as readable text: the file and its config, then one table row per LoRA module."""
    head = [("adapter", info["path"]), ("kind", info["kind"]), ("size", _size(info["file_bytes"]))]
    config = info.get("config") or {}
    if "peft_type" in config:
        keys = (
            "peft_type",
            "task_type",
            "r",
            "lora_alpha",
            "lora_dropout",
            "bias",
            "use_rslora",
            "target_modules",
            "modules_to_save",
            "base_model_name_or_path",
        )
        head += [(f"  {k}", json.dumps(config.get(k))) for k in keys if k in config]
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            head.append(
                (
                    "  rank/alpha_pattern",
                    f"{json.dumps(config.get('rank_pattern'))} {json.dumps(config.get('alpha_pattern'))}",
                )
            )
    elif config:
        head.append(("config", json.dumps(config)))
    modules = table(
        "module",
        "kind",
        "lora_A",
        "lora_B",
        "rank",
        "alpha",
        "params",
        "base weight",
        right=("rank", "alpha", "params"),
    )
    for m in info["modules"]:
        modules.add_row(
            m["module"],
            m["kind"],
            _shape(m["lora_A"]),
            _shape(m["lora_B"]),
            str(m["rank"]),
            "" if m["alpha"] is None else f"{m['alpha']:g}",
            f"{m['params']:,}",
            _shape(m["base_weight_shape"]),
        )
    tail = [f"NOT LOADABLE by lorakit: {info['problem']}"] if info.get("loadable") is False else []
    tail += [
        f"saved in full: {x['name']} {_shape(x.get('shape'))} ({x.get('params', 0):,} params)"
        if "problem" not in x
        else f"problem: {x['name']} {x['problem']}"
        for x in info["extra_tensors"]
    ]
    tail.append(
        f"{len(info['modules'])} LoRA modules, ranks {info['ranks']}, {info['lora_params']:,} LoRA params, "
        f"{info['trainable_params']:,} params in all"
    )
    return to_text(key_values(head), "", modules, *tail)


def _shape(shape: list[int] | None) -> str:
    """A shape as `8×4`; `-` for none."""
    return "×".join(map(str, shape)) if shape else "-"


def _size(n: float) -> str:
    """A byte count in B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
