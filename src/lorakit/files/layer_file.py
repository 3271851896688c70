"""lorakit's one-layer adapter file: `<path>.safetensors` with lora_A, lora_B (+ bias, magnitude) and the config.

metadata: format="lorakit-layer", layer=<LoRA layer class>, config=<LoraConfig JSON>, base_weight_shape=<JSON>
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from ..config import LoraConfig
from ..errors import LoraFileError
from . import safetensors

FORMAT = "lorakit-layer"


def layer_path(path: str | Path) -> Path:
    """`path` with the .safetensors suffix added where it lacks it."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def write_layer_file(
    path: str | Path,
    tensors: dict[str, Tensor],
    config: LoraConfig,
    layer_type: str,
    base_weight_shape: tuple[int, ...],
) -> Path:
    """Write one layer's adapter tensors with its config in the metadata, atomically."""
    path = layer_path(path)
    meta = {
        "format": FORMAT,
        "layer": layer_type,
        "config": json.dumps(config.to_dict()),
        "base_weight_shape": json.dumps(list(base_weight_shape)),
    }
    safetensors.write(path, tensors, meta)
    return path


def read_layer_file(path: str | Path) -> tuple[dict[str, Tensor], LoraConfig, str]:
    """(tensors, config, layer type name) of a `write_layer_file` file; a malformed one raises LoraFileError."""
    path = layer_path(path)
    tensors, meta = safetensors.read(path)
    if meta.get("format") != FORMAT:
        raise LoraFileError(f"{path}: not a lorakit layer adapter (metadata format={meta.get('format')!r})")
    try:
        config = LoraConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise LoraFileError(f"{path}: the config in the metadata is invalid ({e})") from None
    return tensors, config, str(meta.get("layer"))
