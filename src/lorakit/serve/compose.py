"""A request's adapters inside the server: one adapter, the bare base, or a weighted composition of several.

The engine keys every row by `lorakit.composition.row_key` of what its request asked for: None (the base), an
adapter's name (one adapter at weight 1, today's rows), or a normalised `Composition` ((name, weight), ...). The
engine treats that key as opaque (rows of any keys share a mixed forward); only these functions look inside it:
which adapters a row needs loaded, whether they may run together, and the label of its metrics and access log.
"""

from __future__ import annotations

from ..composition import Composition
from ..errors import LoraAdapterNotFound

RowKey = str | None | Composition  # what `row_key` returns: hashable, the engine's per-row key


class NotComposable(ValueError):
    """A DoRA adapter in a composition (or at a weight other than 1): it runs only alone, in a forward of its own."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"adapter {name!r} uses DoRA, whose output is not linear in B·A: it cannot be composed with others or "
            "scaled; request it alone at weight 1"
        )
        self.name = name


def names_of(key: RowKey) -> tuple[str, ...]:
    """The adapters a row of `key` runs (none for the base).

    Examples:
        >>> names_of(None), names_of("sql"), names_of((("sql", 0.5), ("chat", -1.0)))
        ((), ('sql',), ('sql', 'chat'))
    """
    if key is None:
        return ()
    if isinstance(key, str):
        return (key,)
    return tuple(name for name, _ in key)


def uses(key: RowKey, adapter: str | None) -> bool:
    """Whether a row of `key` runs `adapter` (None: whether it runs the bare base)."""
    return key is None if adapter is None else adapter in names_of(key)


def missing(key: RowKey, loaded: frozenset[str]) -> list[str]:
    """The adapters of `key` that are not loaded."""
    return [n for n in names_of(key) if n not in loaded]


def check(key: RowKey, loaded: frozenset[str], solo: frozenset[str]) -> None:
    """LoraAdapterNotFound unless every adapter of `key` is loaded; NotComposable for a DoRA one (in `solo`) unless
    it is the row's only adapter at weight 1."""
    gone = missing(key, loaded)
    if gone:
        raise LoraAdapterNotFound(f"no adapter named {gone[0]!r}; the model has {sorted(loaded)}")
    if not isinstance(key, str):
        dora = [n for n in names_of(key) if n in solo]
        if dora:
            raise NotComposable(dora[0])


def label(key: RowKey) -> str:
    """The `adapter` label of a request in metrics and the access log: "base", the adapter's name, or a
    composition's names joined by "+" (sorted; weights left out, so that labels stay as few as the adapters).

    Examples:
        >>> label(None), label("sql"), label((("sql", 0.5), ("chat", -1.0)))
        ('base', 'sql', 'chat+sql')
    """
    if key is None:
        return "base"
    if isinstance(key, str):
        return key
    return "+".join(sorted(names_of(key)))
