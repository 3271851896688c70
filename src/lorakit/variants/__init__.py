"""LoRA variants that plug into the layer registries: DoRA, PiSSA/OLoRA inits, quantised bases.

Importing a variant's module changes nothing elsewhere; `register()` is the one place that puts the variants
into the core's tables (`layers.LORA_LAYERS`, `layers.BASE_INITS`), and `import lorakit` calls it.
"""

from __future__ import annotations

from torch import nn

from .. import layers
from ..config import BASE_CHANGING_INITS
from .base_init import init_from_base
from .dora import DoraConv1D, DoraLinear


def register() -> None:
    """Put every variant into the core's tables: DoRA's layer classes and the inits that start from the base
    weight. Calling it again changes nothing."""
    layers.LORA_LAYERS[nn.Linear, "dora"] = DoraLinear
    layers.LORA_LAYERS["transformers.pytorch_utils.Conv1D", "dora"] = DoraConv1D
    for init in BASE_CHANGING_INITS:
        layers.BASE_INITS[init] = init_from_base
