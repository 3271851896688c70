"""LoraConfig: the hyper-parameters of one LoRA adapter, validated at construction."""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

INITS = ("kaiming", "gaussian", "pissa", "olora")
BASE_CHANGING_INITS = ("pissa", "olora")  # A, B taken from W at init and W adjusted to match
V = TypeVar("V")


class FrozenMapping(Mapping[str, V]):
    """A read-only, hashable dict: what a frozen config holds where a user passes a dict (so configs hash)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, V] | None = None) -> None:
        self._items = dict(items or {})

    def __getitem__(self, key: str) -> V:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


class LoraBias(str, enum.Enum):
    """Which biases train with the adapter (PEFT's `bias` field)."""

    NONE = "none"  # every base bias stays frozen
    ALL = "all"  # the biases of LoRA-wrapped layers train and are saved with the adapter (PEFT's "lora_only")
    MODEL = "model"  # every bias of the model trains and is saved, wrapped or not (PEFT's "all")

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class LoraConfig:
    """Hyper-parameters of a LoRA adapter: `y = base(x) + scaling * B(A(dropout(x)))`.

    Args:
        rank: r, the inner dimension of the low-rank update (int >= 1).
        alpha: numerator of the scaling; `scaling = alpha / rank` (or `alpha / sqrt(rank)` with rsLoRA).
        dropout: dropout probability on the LoRA branch's input, in [0, 1).
        bias: "none", "all" (biases of LoRA-wrapped layers) or "model" (every bias); see `LoraBias`.
        use_rslora: rank-stabilised scaling (Kalajdzievski 2023).
        init: "kaiming" (A as torch's Linear init) or "gaussian" (A ~ N(0, (1/r)^2), as PEFT); B = 0 either way.
            "pissa" / "olora" (linear layers): A, B from W's top-r SVD / its QR, as PEFT, and the base becomes
            W - scaling·B A so the layer is unchanged at init; saved adapters are converted to a rank-2r LoRA
            for the original W (docs/variants.md).
        use_dora: weight-decomposed LoRA (Liu et al. 2024): a trainable magnitude per output row scales
            the normalised direction W + scaling·B A (linear layers only).
        rank_pattern: per-module rank overrides, PEFT semantics (key = module name suffix or regex); given as a
            dict, held read-only (a `FrozenMapping`, so configs can be hashed and used as keys).
        alpha_pattern: per-module alpha overrides, same matching.

    Examples:
        >>> LoraConfig(rank=4, alpha=8.0).scaling
        2.0
    """

    rank: int
    alpha: float = 1.0
    dropout: float = 0.0
    bias: LoraBias | str = LoraBias.NONE
    use_rslora: bool = False
    init: str = "kaiming"
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_dora: bool = False

    def __post_init__(self) -> None:
        _check_rank("rank", self.rank)
        _check_alpha("alpha", self.alpha)
        object.__setattr__(self, "alpha", float(self.alpha))
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0.0 <= d < 1.0):
            raise ValueError(f"LoraConfig.dropout={d!r} is invalid: expected a float in [0, 1)")
        object.__setattr__(self, "dropout", float(d))
        try:
            object.__setattr__(self, "bias", LoraBias(self.bias))
        except ValueError:
            allowed = ", ".join(repr(b.value) for b in LoraBias)
            raise ValueError(f"LoraConfig.bias={self.bias!r} is invalid: expected one of {allowed}") from None
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoraConfig.use_rslora={self.use_rslora!r} is invalid: expected True or False")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig.use_dora={self.use_dora!r} is invalid: expected True or False")
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init={self.init!r} is invalid: expected one of {', '.join(map(repr, INITS))}")
        for name, pattern, check in (
            ("rank_pattern", self.rank_pattern, _check_rank),
            ("alpha_pattern", self.alpha_pattern, _check_alpha),
        ):
            if not isinstance(pattern, Mapping):
                raise ValueError(
                    f"LoraConfig.{name}={pattern!r} is invalid: expected a dict of module pattern -> value"
                )
            for key, value in pattern.items():
                if not isinstance(key, str) or not key:
                    raise ValueError(f"LoraConfig.{name} key {key!r} is invalid: expected a non-empty module pattern")
                try:  # keys are matched as regexes (PEFT's rule, see _pattern_key)
                    re.compile(key)
                except re.error as e:
                    raise ValueError(f"LoraConfig.{name} key {key!r} is not a valid regex: {e}") from None
                check(f"{name}[{key!r}]", value)
            object.__setattr__(
                self, name, FrozenMapping({k: (float(v) if name == "alpha_pattern" else v) for k, v in pattern.items()})
            )

    @property
    def scaling(self) -> float:
        """The factor on B·A: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def variant(self) -> str:
        """Which LoRA layer class the adapter needs beside a module type: "dora" or "lora" (the registry's key)."""
        return "dora" if self.use_dora else "lora"

    def for_module(self, name: str) -> LoraConfig:
        """The config of one module: rank and alpha resolved from the patterns (PEFT's matching rules)."""
        if not self.rank_pattern and not self.alpha_pattern:
            return self
        rank_key = _pattern_key(self.rank_pattern, name)
        alpha_key = _pattern_key(self.alpha_pattern, name)
        return replace(
            self,
            rank=self.rank_pattern[rank_key] if rank_key is not None else self.rank,
            alpha=self.alpha_pattern[alpha_key] if alpha_key is not None else self.alpha,
            rank_pattern={},
            alpha_pattern={},
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `LoraConfig(**d)` rebuilds the config."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "bias": LoraBias(self.bias).value,
            "use_rslora": self.use_rslora,
            "init": self.init,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_dora": self.use_dora,
        }


def _pattern_key(pattern: Mapping[str, object], name: str) -> str | None:
    """PEFT's rule: a key matches a module whose name is the key or ends with ".<key>" (key read as a regex)."""
    for key in pattern:
        if key == name or re.match(rf"(.*\.)?(?:{key})$", name):
            return key
    return None


def _check_rank(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"LoraConfig.{what}={value!r} is invalid: expected an int >= 1")


def _check_alpha(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"LoraConfig.{what}={value!r} is invalid: expected a finite number > 0")
