"""A completion request's composition of adapters, from lorakit's `adapters` field or llama.cpp's `lora`, checked.

    {"model": "llama", "adapters": [{"name": "sql", "weight": 0.7}, {"name": "chat", "weight": -0.3}]}
    {"model": "llama", "lora": [{"id": 0, "scale": 0.7}, {"name": "chat", "scale": -0.3}]}

Row i of the batch then runs y = base(x) + Σ_k w_k · ΔW_k x, batched with every other request whatever it runs.
`"model"` names the base when either field is given; the two fields are not given together. An empty list, or
every weight 0, is the bare base; one adapter at weight 1 is exactly a request naming it in `"model"`. `lora`'s
`id` is the adapter's index in GET /lora-adapters (llama.cpp server's route, also served here). Every refusal
names the field and the item at fault: unknown adapters 404, the rest (duplicates, non-finite or huge weights,
more adapters than --max-loaded, a DoRA adapter composed) 400.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter

from ..composition import row_key
from . import schemas
from .compose import RowKey, names_of
from .protocol import APIError, ChatRequest, CompletionRequest
from .registry import Registry

MAX_WEIGHT = 100.0  # a larger weight drives the activations out of range (inf/NaN answers) rather than meaning more

Body = CompletionRequest | ChatRequest


def requested(body: Body, resolve: Callable[[str], str | None], registry: Registry) -> RowKey:
    """The row key a request asks for: `"model"`'s adapter (None: the base), or its `adapters`/`lora` composition.

    Raises APIError: 404 for an unknown model or adapter, 400 for anything else wrong (the param names the item).
    """
    if body.adapters is not None and body.lora is not None:
        raise APIError(400, "give the adapters of a composition in `adapters` or in `lora`, not both", param="lora")
    adapter = resolve(body.model)
    field = "adapters" if body.adapters is not None else "lora" if body.lora is not None else None
    if field is None:
        return adapter
    if adapter is not None:
        raise APIError(
            400,
            f"'model' names the adapter {adapter!r}: with {field!r}, 'model' must name the base model and "
            f"{field!r} every adapter (add {adapter!r} to it)",
            param=field,
        )
    known = registry.names()
    pairs = _adapters(body, known) if field == "adapters" else _lora(body, known)
    _refuse_duplicates(field, pairs)
    key = row_key([(name, weight) for name, weight, _ in pairs])
    limit = registry.max_loaded
    if limit is not None and len(names_of(key)) > limit:
        raise APIError(
            400,
            f"{field!r} composes {len(names_of(key))} adapters; this server loads at most {limit} at once "
            "(max_loaded), and a composition's adapters must all be loaded while it runs",
            param=field,
        )
    return key


def _adapters(body: Body, known: list[str]) -> list[tuple[str, float, str]]:
    """(name, weight, where) of each item of `adapters`, every name known and every weight usable."""
    out = []
    for i, item in enumerate(body.adapters or ()):
        where = f"adapters[{i}]"
        _known(item.name, known, where + ".name")
        out.append((item.name, _weight(item.weight, where + ".weight"), where + ".name"))
    return out


def _lora(body: Body, known: list[str]) -> list[tuple[str, float, str]]:
    """(name, scale, where) of each item of `lora`: an `id` (index in GET /lora-adapters) or a `name`."""
    out = []
    for i, item in enumerate(body.lora or ()):
        where = f"lora[{i}]"
        if (item.id is None) == (item.name is None):
            raise APIError(400, f"{where}: give the adapter's 'id' or its 'name' (one of them)", param=where)
        if item.id is not None:
            if not 0 <= item.id < len(known):
                raise APIError(
                    404,
                    f"{where}.id: no adapter has id {item.id}; the ids are 0..{len(known) - 1} (GET /lora-adapters)"
                    if known
                    else f"{where}.id: no adapter has id {item.id}; this server has no adapters",
                    param=where + ".id",
                    code="adapter_not_found",
                )
            name, at = known[item.id], where + ".id"
        else:
            name, at = str(item.name), where + ".name"
            _known(name, known, at)
        out.append((name, _weight(item.scale, where + ".scale"), at))
    return out


def _known(name: str, known: list[str], where: str) -> None:
    """APIError 404 (naming `where`) unless `name` is an adapter of this server."""
    if name not in known:
        raise APIError(
            404,
            f"{where}: no adapter named {name!r}; this server has {known} (GET /v1/models)",
            param=where,
            code="adapter_not_found",
        )


def _weight(value: float, where: str) -> float:
    """The weight, refused (naming `where`) unless it is finite and at most MAX_WEIGHT in magnitude."""
    if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
        raise APIError(
            400, f"{where}: {value!r} is not a usable weight; expected a finite number in [-100, 100]", param=where
        )
    return float(value)


def _refuse_duplicates(field: str, pairs: list[tuple[str, float, str]]) -> None:
    """APIError 400 naming the second item of an adapter given twice (its weights would be ambiguous: sum them)."""
    seen: dict[str, str] = {}
    for name, _, where in pairs:
        if name in seen:
            raise APIError(
                400,
                f"{where}: the adapter {name!r} is already in {field!r} ({seen[name]}); give each adapter once, "
                "with the sum of its weights",
                param=where,
            )
        seen[name] = where


def where_is(body: Body, name: str, known: Sequence[str]) -> str:
    """The request field naming adapter `name` (`adapters[i]`, `lora[i]`, or `model`), for an error about it."""
    for i, item in enumerate(body.adapters or ()):
        if item.name == name:
            return f"adapters[{i}]"
    for i, entry in enumerate(body.lora or ()):
        if entry.name == name or (entry.id is not None and 0 <= entry.id < len(known) and known[entry.id] == name):
            return f"lora[{i}]"
    return "model"


def router(registry: Registry) -> APIRouter:
    """GET /lora-adapters: llama.cpp server's list of adapters, whose `id`s a request's `lora` field names."""
    routes = APIRouter()

    @routes.get("/lora-adapters", responses=schemas.responses(schemas.LoraAdapters))
    async def lora_adapters() -> list[dict[str, Any]]:
        """Every adapter a request can name, with its id (its index here), path, name, and scale 0 (no adapter
        applies unless a request names it)."""
        return [
            {"id": i, "path": str(path), "name": name, "scale": 0.0} for i, (name, path) in enumerate(registry.known())
        ]

    return routes
