"""PEFT's adapter directory, both ways: its key names, its `adapter_config.json` fields, and reading one whole.

PEFT features lorakit does not have are refused by name, never dropped. This is the one module that speaks
PEFT's vocabulary (key suffixes, field names, bias modes); the rest of lorakit asks it.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config import INITS, LoraBias, LoraConfig
from ..errors import LoraFileError
from . import hub_cache, provenance, safetensors
from .atomic import locked_dir
from .expert_layout import WRITTEN_AS

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1024 * 1024
PREFIX = "base_model.model."  # PEFT's key prefix for the wrapped model's modules

# lorakit's tensor name -> PEFT's key suffix, per layer layout (the one definition of PEFT's key names)
SUFFIXES: dict[str, dict[str, str]] = {
    "linear": {
        "lora_A": "lora_A.weight",
        "lora_B": "lora_B.weight",
        "bias": "base_layer.bias",
        "lora_magnitude": "lora_magnitude_vector",  # DoRA's m, as PEFT 0.21 saves it
        "base_weight": "base_layer.weight",
    },  # saved whole only for resized vocabularies
    "embedding": {
        "lora_A": "lora_embedding_A",
        "lora_B": "lora_embedding_B",
        "bias": "base_layer.bias",
        "base_weight": "base_layer.weight",
    },
    "param": {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"},  # target_parameters: files.peft_params
}

# lorakit's bias modes <-> PEFT's `bias` field. lorakit's "all" (burn's name) is the wrapped layers' biases,
# which PEFT calls "lora_only"; PEFT's "all" (every bias of the model) is lorakit's "model".
BIAS_TO_PEFT = {LoraBias.NONE: "none", LoraBias.ALL: "lora_only", LoraBias.MODEL: "all"}
BIAS_FROM_PEFT = {peft: ours for ours, peft in BIAS_TO_PEFT.items()}


def peft_key(module: str, tensor: str, layout: str = "linear") -> str:
    """The PEFT state-dict key of `tensor` ("lora_A", "lora_B", "bias", "lora_magnitude") of a LoRA `module`."""
    return f"{PREFIX}{module}.{SUFFIXES[layout][tensor]}"


def param_key(owner: str, depth: int, tensor: str) -> str:
    """The PEFT key of `tensor` ("lora_A", "lora_B") of LoRA on a parameter of module `owner` (target_parameters).

    PEFT nests the wrappers of one module's adapted parameters, the first registered innermost: a parameter with
    `depth` adapted ones registered after it sits under that many `base_layer`s (Qwen3-MoE's gate_up_proj beside an
    adapted down_proj: `experts.base_layer.lora_A.weight`; down_proj: `experts.lora_A.weight`).
    """
    return f"{PREFIX}{owner}{'.base_layer' * depth}.{SUFFIXES['param'][tensor]}"


def plain_key(module: str, param: str) -> str:
    """The PEFT key of a parameter of a module without LoRA (modules_to_save, biases under PEFT's bias="all")."""
    return f"{PREFIX}{module}.{param}"


def split_key(key: str) -> tuple[str, str, str] | None:
    """(module, lorakit tensor name, layout) of a PEFT LoRA key; None for any other key."""
    name = key.removeprefix(PREFIX)
    for layout, suffixes in SUFFIXES.items():
        for tensor, suffix in suffixes.items():
            if name.endswith("." + suffix):
                return name[: -len(suffix) - 1], tensor, layout
    return None


def is_peft_copy(key: str) -> bool:
    """PEFT's bookkeeping copies of modules_to_save (the plain key carries the trained value)."""
    return ".original_module." in key or ".modules_to_save." in key


# PEFT config keys we read, or that carry no behaviour for a saved adapter
_UNDERSTOOD = {
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "target_parameters", "bias",
    "use_rslora", "fan_in_fan_out", "init_lora_weights", "rank_pattern", "alpha_pattern", "modules_to_save",
    "exclude_modules", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "megatron_core", "qalora_group_size", "ensure_weight_tying", "eva_config", "lorakit", "use_dora",
}  # fmt: skip
# adapter_config.json fields that change what a loaded adapter computes (lorakit.json records them at save time):
# not the dropout or the init (training only), the base's path or the bookkeeping fields, nor task_type (which
# `lorakit finetune` sets after the save; the task head is modules_to_save, its weights among the tensors)
COMPUTATION_FIELDS = (
    "peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora", "target_modules",
    "target_parameters", "exclude_modules", "layers_to_transform", "layers_pattern", "bias", "modules_to_save",
    "fan_in_fan_out",
)  # fmt: skip


def computation_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The COMPUTATION_FIELDS of a raw adapter_config.json, an unset one (absent, null, false, empty) as None, so
    that a tool re-writing the file with its defaults spelled out or left out does not count as a change.

    Examples:
        >>> computation_fields({"r": 8, "lora_alpha": 16, "use_rslora": False, "alpha_pattern": {}})["lora_alpha"]
        16
    """
    unset = (None, False, "")
    return {
        k: None if any(v is u for u in unset) or (isinstance(v, (dict, list, str)) and not v) else v
        for k in COMPUTATION_FIELDS
        for v in [raw.get(k)]
    }


def replaced_base_tensors(keys: Iterable[str]) -> set[str]:
    """Names of the base tensors an adapter with these PEFT keys writes into the model when it loads (trained
    biases, modules_to_save, whole embedding weights): the adapter's own tensors, not part of its base."""
    out = set()
    for key in keys:
        if is_peft_copy(key):
            continue
        split = split_key(key)
        if split is None:  # a plain key: modules_to_save, or a bias under bias="all"
            out.add(key.removeprefix(PREFIX))
        elif split[1] in ("bias", "base_weight"):
            out.add(f"{split[0]}.{'bias' if split[1] == 'bias' else 'weight'}")
    return out


_Kinds = type | tuple[type, ...]  # what isinstance takes: the JSON types a config key may hold
# init_lora_weights values that assume a base changed at init time (PiSSA, OLoRA, CorDA, LoftQ, ...)
_INIT_OK = (True, False, "gaussian", "eva", "orthogonal")


def to_peft_config(
    configs: dict[str, LoraConfig],
    other_modules: list[str],
    *,
    fan_in_fan_out: bool = False,
    modules_to_save: list[str] | None = None,
    name_or_path: str | None = None,
    parameters: Collection[str] = (),
) -> dict[str, Any]:
    """adapter_config.json for LoRA on `configs` (module name, or a `parameters` path -> its config), in PEFT's
    vocabulary.

    Targets are written as the exact module names (a regex of them where a name is also the suffix of
    one of `other_modules`), adapted parameters as their exact paths (`target_parameters`, with `target_modules`
    empty where no module is adapted, as PEFT writes it); ranks and alphas that differ from the most common go to
    rank/alpha_pattern. A `name_or_path` in the hub cache (a snapshot directory) is written as its hub id, its
    commit as `revision`.
    """
    base = (
        Counter(c.rank for c in configs.values()).most_common(1)[0][0],
        Counter(c.alpha for c in configs.values()).most_common(1)[0][0],
    )
    one = next(iter(configs.values()))
    names = [n for n in configs if n not in parameters]
    if any(n.endswith("." + t) for n in other_modules for t in names):
        target_modules: list[str] | str = "|".join(re.escape(n) for n in names)  # a regex string: exact names
    else:
        target_modules = names
    hub_base = hub_cache.snapshot_of(name_or_path)  # a base from the hub cache: its id and commit, as PEFT records
    rank_pattern = {_exact_key(n, list(configs)): c.rank for n, c in configs.items() if c.rank != base[0]}
    alpha_pattern = {_exact_key(n, list(configs)): c.alpha for n, c in configs.items() if c.alpha != base[1]}
    params = {"target_parameters": sorted(parameters), "peft_version": WRITTEN_AS} if parameters else {}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": hub_base.repo_id if hub_base else name_or_path,
        "revision": hub_base.commit if hub_base else None,
        "r": base[0],
        "lora_alpha": base[1],
        "lora_dropout": one.dropout,
        "target_modules": target_modules,
        **params,
        "bias": BIAS_TO_PEFT[LoraBias(one.bias)],
        "use_rslora": one.use_rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True if one.init == "kaiming" else one.init,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": list(modules_to_save or ()) or None,
        "use_dora": one.use_dora,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def _exact_key(name: str, names: list[str]) -> str:
    """A rank/alpha_pattern key that PEFT matches to `name` only: plain where unambiguous, else anchored."""
    if sum(1 for n in names if re.match(rf"(.*\.)?({name})$", n)) == 1:
        return name
    return "^" + re.escape(name)


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter directory asks for, read from its config: LoRA config, targets, extra modules."""

    config: LoraConfig
    targets: list[str]
    exclude: list[str]
    modules_to_save: list[str]
    raw: dict[str, Any]
    target_parameters: list[str] = field(default_factory=list)  # PEFT's rules on `module.param` paths


def read_adapter_config(directory: str | Path) -> AdapterSpec:
    """Read and validate `adapter_config.json`; PEFT features lorakit lacks are refused by name."""
    path = Path(directory) / CONFIG_NAME
    raw = _read_config_object(path)
    init = _supported_init(raw, path)
    bias = _field(raw, path, "bias", str, "none")
    if bias not in BIAS_FROM_PEFT:
        raise LoraFileError(f"{path}: key 'bias' is {bias!r}; expected {', '.join(map(repr, BIAS_FROM_PEFT))}")
    params = _field(raw, path, "target_parameters", list, None) or []
    if not all(isinstance(t, str) and t for t in params):
        raise LoraFileError(f"{path}: key 'target_parameters' must be a list of parameter names")
    targets = _field(raw, path, "target_modules", (list, str), [], required=not params)
    if isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
        raise LoraFileError(f"{path}: key 'target_modules' must be a list of strings or a regex string")
    exclude = _field(raw, path, "exclude_modules", (list, str), None)
    modules_to_save = _field(raw, path, "modules_to_save", list, None) or []
    for key, value in (("exclude_modules", exclude), ("modules_to_save", modules_to_save)):
        if isinstance(value, list) and not all(isinstance(v, str) and v for v in value):
            raise LoraFileError(f"{path}: key {key!r} must be a list of module names")
    config = _lora_config(raw, path, bias, init)
    for key, value in (("target_modules", targets), ("exclude_modules", exclude)):
        if isinstance(value, str) and value != "all-linear":  # PEFT reads a string as a full-match regex
            try:
                re.compile(value)
            except re.error as e:
                raise LoraFileError(f"{path}: key {key!r} is {value!r}, not a valid regex: {e}") from None
    rules = _rules(exclude) if exclude else []
    return AdapterSpec(config, _rules(targets), rules, list(modules_to_save), raw, list(params))


def _read_config_object(path: Path) -> dict[str, Any]:
    """The JSON object in the config file at `path`; LoraFileError where it is missing, too big or not one."""
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file (an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise LoraFileError(
            f"{path}: {path.stat().st_size} bytes is past the {MAX_CONFIG_BYTES}-byte limit for a config"
        )
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LoraFileError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(raw, dict):
        raise LoraFileError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _field(
    raw: dict[str, Any], path: Path, key: str, kinds: _Kinds, default: Any = None, required: bool = False
) -> Any:
    """The config's value at `key`, checked to be of `kinds` (a bool only where bool is named); `default` if unset."""
    if raw.get(key) is None:
        if required:
            raise LoraFileError(f"{path}: missing key {key!r}")
        return default
    v = raw[key]
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in _tuple(kinds)):
        raise LoraFileError(f"{path}: key {key!r} is {v!r}; expected {_kind_names(kinds)}")
    return v


def _supported_init(raw: dict[str, Any], path: Path) -> Any:
    """The config's init_lora_weights, after refusing by name a PEFT type or feature lorakit lacks."""
    if _field(raw, path, "peft_type", str, required=True) != "LORA":
        raise LoraFileError(f"{path}: peft_type {raw['peft_type']!r} is not supported; expected 'LORA'")
    for key, value in raw.items():
        if key not in _UNDERSTOOD and value not in (None, False, {}, [], ""):
            raise LoraFileError(f"{path}: PEFT feature {key}={value!r} is not supported by lorakit")
    init = raw.get("init_lora_weights", True)
    if init not in _INIT_OK:
        raise LoraFileError(
            f"{path}: init_lora_weights={init!r} is not supported: that adapter expects a base "
            f"changed at init time; supported: {', '.join(map(repr, _INIT_OK))}"
        )
    return init


def _lora_config(raw: dict[str, Any], path: Path, bias: str, init: Any) -> LoraConfig:
    """The LoraConfig the config's fields say (PEFT's bias name `bias`, init `init`); LoraFileError naming the field."""
    try:
        return LoraConfig(
            rank=_field(raw, path, "r", int, required=True),
            alpha=_field(raw, path, "lora_alpha", (int, float), 8),
            dropout=_field(raw, path, "lora_dropout", (int, float), 0.0),
            bias=BIAS_FROM_PEFT[bias],
            use_rslora=_field(raw, path, "use_rslora", bool, False),
            init=init if init in INITS else "kaiming",
            rank_pattern=_field(raw, path, "rank_pattern", dict, None) or {},
            alpha_pattern=_field(raw, path, "alpha_pattern", dict, None) or {},
            use_dora=_field(raw, path, "use_dora", bool, False),
        )
    except ValueError as e:
        raise LoraFileError(f"{path}: {e}") from None


def _tuple(kinds: _Kinds) -> tuple[type, ...]:
    """`kinds` as a tuple of types."""
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _kind_names(kinds: _Kinds) -> str:
    """The JSON kinds in words, for error messages."""
    return " or ".join(
        {
            "str": "a string",
            "int": "an int",
            "float": "a number",
            "bool": "true/false",
            "list": "a list",
            "dict": "an object",
        }[k.__name__]
        for k in _tuple(kinds)
    )


def _rules(peft_targets: list[str] | str) -> list[str]:
    """PEFT target semantics in lorakit rules: a list is names/suffixes, a string is a full-match regex."""
    if isinstance(peft_targets, str):
        return ["all-linear"] if peft_targets == "all-linear" else [f"re:{peft_targets}"]
    return list(peft_targets)


@dataclass(frozen=True)
class AdapterFile:
    """An adapter directory read whole: its validated config and its tensors by PEFT key."""

    spec: AdapterSpec
    tensors: dict[str, Tensor]
    where: str  # the weights file, for error messages
    config_path: str
    sidecar: provenance.Sidecar | None = None  # lorakit.json, read in the same locked read; None: PEFT-made
    stamp: tuple[int, ...] | None = None  # the weights file's (device, inode, size, mtime ns) as it was read


def read_adapter(directory: str | Path) -> AdapterFile:
    """Read an adapter directory once (config validated, safetensors parsed); touches no model.

    PEFT's bookkeeping copies of modules_to_save are dropped: the plain key carries the trained value.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise LoraFileError(f"{directory}: not an adapter directory (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    with locked_dir(directory, exclusive=False):  # config and weights of one save, never of two
        spec = read_adapter_config(directory)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
            hint = f" ({', '.join(pickled)} is pickle, which lorakit never loads)" if pickled else ""
            raise LoraFileError(f"{weights}: no such file{hint}")
        before = _stamp(weights)
        tensors, _ = safetensors.read(weights)
        sidecar = provenance.read(directory)
        stamp = before if _stamp(weights) == before and _settled(before) else None
    tensors = {k: t for k, t in tensors.items() if not is_peft_copy(k)}
    return AdapterFile(spec, tensors, str(weights), str(directory / CONFIG_NAME), sidecar, stamp)


def _stamp(path: Path) -> tuple[int, ...]:
    """What changes when a file is rewritten, replaced or edited: device, inode, size, modification time (ns)."""
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _settled(stamp: tuple[int, ...]) -> bool:
    """Whether the file was last modified over 2 s ago. A file's clock ticks coarsely (a few ms on ext4), so an
    edit right after a read can leave the stamp as it was; like git's "racily clean" entries, a file younger
    than that is never vouched for by its stamp (a stamp is also lost if the file changes while being read)."""
    return time.time_ns() - stamp[3] > 2_000_000_000
