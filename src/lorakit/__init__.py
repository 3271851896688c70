"""lorakit: LoRA for PyTorch — wrap, train, save, share, swap and merge low-rank adapters."""

from .adapter_table import AdapterTable
from .adapters import (
    CombineReport,
    active_adapter,
    combine_adapters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    mixed_batch,
    set_adapter,
    use_adapter,
)
from .composition import Composition, RowSpec, composition, row_key
from .config import LoraBias, LoraConfig
from .errors import (
    LayoutNote,
    LoraAdapterNotFound,
    LoraBaseMismatch,
    LoraError,
    LoraFileChanged,
    LoraFileError,
    LoraMergeError,
    LoraStateError,
    ProvenanceNote,
)
from .files.peft_format import read_adapter_config
from .layers import LoraConv, LoraConv1D, LoraEmbedding, LoraLayer, LoraLinear, with_lora
from .loading import load_adapters
from .model import apply_lora, lora_layers, merge, merge_, summary, trainable_parameters, unmerge_
from .param_layers import LoraParam
from .param_targets import ParamTargets, params
from .saving import save_adapters
from .trained_copy import TrainedCopy
from .variants import register as _register_variants
from .variants.dora import DoraLinear

_register_variants()  # DoRA's layers and the PiSSA/OLoRA inits into the core's tables

__version__ = "0.1.0"

__all__ = [
    "CombineReport",
    "DoraLinear",
    "LoraAdapterNotFound",
    "active_adapter",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "list_adapters",
    "mixed_batch",
    "AdapterTable",
    "Composition",
    "RowSpec",
    "composition",
    "row_key",
    "set_adapter",
    "use_adapter",
    "LoraBias",
    "LoraConfig",
    "LoraConv",
    "LoraConv1D",
    "LoraEmbedding",
    "LoraError",
    "LoraFileError",
    "LoraFileChanged",
    "LoraBaseMismatch",
    "ProvenanceNote",
    "LayoutNote",
    "LoraLayer",
    "LoraLinear",
    "LoraParam",
    "ParamTargets",
    "params",
    "LoraMergeError",
    "LoraStateError",
    "apply_lora",
    "load_adapters",
    "lora_layers",
    "merge",
    "merge_",
    "read_adapter_config",
    "save_adapters",
    "summary",
    "trainable_parameters",
    "unmerge_",
    "with_lora",
    "TrainedCopy",
]
