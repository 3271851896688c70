"""What one row of a mixed batch runs: the bare base, one adapter, or a weighted sum of adapters.

    y = base(x) + Σ_k w_k · s_k · B_k A_k x          (s_k: adapter k's scaling)

the per-row equivalent of `combine_adapters(weights, method="cat")`, without building the combined adapter. A row
is given as a `RowSpec` (None, a name, {name: weight}, or (name, weight) pairs) and normalised by `composition`
into a `Composition`: (name, weight) pairs in the order given, names unique, weights finite floats, zero weights
dropped, so () is the bare base. `row_key` is the hashable key a caller (the serving engine) groups rows by: None
for the base, the name for one adapter at weight 1 (today's rows, which keep today's path and bits), otherwise
the normalised Composition.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TypeAlias

__all__ = ["Composition", "RowSpec", "composition", "row_key"]

Composition: TypeAlias = tuple[tuple[str, float], ...]
RowSpec: TypeAlias = str | None | Composition | Mapping[str, float] | Sequence[tuple[str, float]]


def composition(spec: RowSpec) -> Composition:
    """`spec` normalised: (name, weight) pairs in order, names unique, weights finite floats, zeros dropped.

    Args:
        spec: None (the base), an adapter name, {name: weight}, or a sequence of (name, weight) pairs.

    Raises:
        ValueError: naming the bad entry: an empty or non-str name, a duplicate name, a weight that is not a finite
            real number, an item that is not a (name, weight) pair.

    Examples:
        >>> composition(None), composition("a")
        ((), (('a', 1.0),))
        >>> composition({"a": 0.7, "b": -0.3, "c": 0})
        (('a', 0.7), ('b', -0.3))
    """
    if spec is None:
        return ()
    if isinstance(spec, str):
        return (_pair(spec, 1.0),)
    items = list(spec.items()) if isinstance(spec, Mapping) else _pairs(spec)
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for name, weight in items:
        name, weight = _pair(name, weight)
        if name in seen:
            raise ValueError(f"adapter {name!r} appears twice in the composition {spec!r}: expected unique names")
        seen.add(name)
        if weight != 0.0:
            out.append((name, weight))
    return tuple(out)


def row_key(spec: RowSpec) -> str | None | Composition:
    """The hashable key of a row: None for the bare base (all-zero weights too), the name for one adapter at
    weight 1, else the normalised `Composition`.

    Examples:
        >>> row_key({"a": 0.0}), row_key([("a", 1.0)]), row_key({"a": 0.5})
        (None, 'a', (('a', 0.5),))
    """
    parts = composition(spec)
    if not parts:
        return None
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    return parts


def _pairs(spec: object) -> list[tuple[object, object]]:
    """The (name, weight) pairs of a sequence spec; ValueError naming what is not a pair."""
    if not isinstance(spec, Sequence):
        raise ValueError(
            f"an adapter row is None, a name, {{name: weight}} or (name, weight) pairs, not {type(spec).__name__}"
        )
    out = []
    for item in spec:
        if isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError(f"{item!r} in the composition {spec!r} is not a (name, weight) pair")
        out.append((item[0], item[1]))
    return out


def _pair(name: object, weight: object) -> tuple[str, float]:
    """(name, float(weight)) checked: a non-empty str name, a finite real weight."""
    if not isinstance(name, str):
        raise ValueError(f"adapter name {name!r} is a {type(name).__name__}: expected a str")
    if not name:
        raise ValueError("an adapter name in a composition is empty: expected a non-empty name")
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise ValueError(f"the weight of adapter {name!r} is {weight!r}: expected a real number")
    w = float(weight)
    if not math.isfinite(w):
        raise ValueError(f"the weight of adapter {name!r} is {weight!r}: expected a finite number")
    return name, w
