"""What an adapter holds, without a model: config, targets, per-module shapes and ranks, sizes, base dims.

Works on lorakit- and PEFT-made directories, a bare `adapter_model.safetensors`, and lorakit layer files.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from rich.table import Table
from torch import Tensor

from ..config import LoraConfig
from ..errors import LoraFileError
from ..ui.tables import key_values, table, to_text
from . import expert_layout, peft_format
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
    directory, weights = _locate(path)
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
    spec = _read_config(directory, info) if directory is not None else None
    fan_in_fan_out = bool(info["config"] and info["config"].get("fan_in_fan_out"))
    modules, extra = _group_by_module(tensors)
    rows = []
    for name, entry in modules.items():
        a, b = entry.get("A"), entry.get("B")
        if a is None or b is None:
            extra.append({"name": name, "problem": "has lora_A without lora_B (or the reverse)"})
            continue
        if spec is not None and _is_param_site(name, spec):
            rows.append(_param_row(name, entry, a, b, spec))
            continue
        rows.append(_module_row(name, entry, a, b, spec.config.for_module(name) if spec else None, fan_in_fan_out))
    info["modules"] = rows
    info["extra_tensors"] = extra  # modules_to_save (e.g. a classification head) and anything unrecognised
    info["lora_params"] = sum(r["params"] for r in rows)
    info["trainable_params"] = info["lora_params"] + sum(x.get("params", 0) for x in extra)
    info["ranks"] = sorted({r["rank"] for r in rows})
    if spec is not None:
        info["targets"] = spec.targets
        info["modules_to_save"] = spec.modules_to_save
        info["target_parameters"] = spec.target_parameters
    if spec is not None and spec.target_parameters:
        version = spec.raw.get("peft_version")
        said = expert_layout.layout_of_version(version)
        info["expert_layout"] = (
            f"{said} (peft_version {version})" if said else f"told by the shapes on load (peft_version {version!r})"
        )
    return info


def _is_param_site(name: str, spec: peft_format.AdapterSpec) -> bool:
    """Whether the factors under PEFT module path `name` adapt a parameter (target_parameters), not a module."""
    if not spec.target_parameters:
        return False
    owner = name.replace(".base_layer", "")
    return not any(
        (re.fullmatch(t[3:], owner) is not None) if t.startswith("re:") else (owner == t or owner.endswith("." + t))
        for t in spec.targets
    )


def _param_row(name: str, entry: dict[str, Any], a: list[int], b: list[int], spec: peft_format.AdapterSpec) -> dict:
    """One adapted parameter's row: PEFT's flat factors (lora_A (E·r, in), lora_B (out, r·E)), E from the rank.

    Which parameter of the module it is depends on the model's registration order (PEFT nests them), so the row
    names the module and its nesting depth; the config's target_parameters list the parameters.
    """
    owner, depth = name.replace(".base_layer", ""), name.count(".base_layer")
    cfg = spec.config.for_module(owner)
    experts = a[0] // cfg.rank if cfg.rank and a[0] % cfg.rank == 0 else None
    return {
        "module": owner + (f" (nested {depth})" if depth else ""),
        "kind": "parameter" if experts in (None, 1) else f"parameter, {experts} experts",
        "lora_A": a,
        "lora_B": b,
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "scaling": cfg.scaling,
        "bias": False,
        "params": math.prod(a) + math.prod(b),
        "dtype": entry.get("dtype"),
        "base_weight_shape": None,  # (E, out, in) or (E, in, out): the owner's layout, unknown without the model
    }


def _locate(path: Path) -> tuple[Path | None, Path]:
    """(the adapter directory, or None for a bare file; the weights file) of `path`; LoraFileError where none."""
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
    return directory, weights


def _read_config(directory: Path, info: dict[str, Any]) -> peft_format.AdapterSpec | None:
    """The directory's adapter config into `info` (raw JSON, loadable, problem, bytes); its spec if lorakit loads it."""
    spec = None
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
    return spec


def _group_by_module(tensors: dict[str, Tensor]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """({module: its factors' shapes, dtype and layout}, [every other tensor]) of an adapter's weights."""
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
    return modules, extra


def _module_row(
    name: str, entry: dict[str, Any], a: list[int], b: list[int], cfg: LoraConfig | None, fan_in_fan_out: bool
) -> dict[str, Any]:
    """One module's row: its kind and base weight shape told from the factors A (`a`) and B (`b`), rank, params."""
    rank, d_out = a[0], b[0]
    d_in = a[1:]
    if entry.get("layout") == "embedding":  # A (r, num_embeddings), B (dim, r)
        base_shape, kind = [a[1], d_out], "embedding"
    elif len(a) > 2:  # conv: A (r, d_in, *k), B (d_out, r, 1...)
        base_shape, kind = [d_out, *d_in], f"conv{len(a) - 2}d"
    else:
        base_shape, kind = ([d_in[0], d_out] if fan_in_fan_out else [d_out, d_in[0]]), "linear"
    params = math.prod(a) + math.prod(b) + sum(math.prod(entry[k]) for k in ("bias", "magnitude") if k in entry)
    return {
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
    head += _config_lines(info.get("config") or {})
    if info.get("expert_layout"):
        head.append(("  expert layout", info["expert_layout"]))
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
    return to_text(key_values(head), "", _modules_table(info["modules"]), *tail)


def _config_lines(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, value) lines of an adapter config: PEFT's main fields one a line, another config as one JSON line."""
    if "peft_type" not in config:
        return [("config", json.dumps(config))] if config else []
    keys = (
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "bias",
        "use_rslora",
        "target_modules",
        "target_parameters",
        "peft_version",
        "modules_to_save",
        "base_model_name_or_path",
    )
    lines = [(f"  {k}", json.dumps(config.get(k))) for k in keys if k in config]
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        lines.append(
            (
                "  rank/alpha_pattern",
                f"{json.dumps(config.get('rank_pattern'))} {json.dumps(config.get('alpha_pattern'))}",
            )
        )
    return lines


def _modules_table(modules: list[dict[str, Any]]) -> Table:
    """One row per LoRA module: its kind, factor shapes, rank, alpha, params and base weight shape."""
    t = table(
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
    for m in modules:
        t.add_row(
            m["module"],
            m["kind"],
            _shape(m["lora_A"]),
            _shape(m["lora_B"]),
            str(m["rank"]),
            "" if m["alpha"] is None else f"{m['alpha']:g}",
            f"{m['params']:,}",
            _shape(m["base_weight_shape"]),
        )
    return t


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
