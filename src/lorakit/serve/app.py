"""The FastAPI app of `lorakit serve`: one local model and its adapters behind OpenAI's API (and vLLM's extras).

    GET  /health                    {"status": "ready"} (never needs the API key)
    GET  /v1/models                 the base model and every adapter (its parent, root and lineage)
    POST /v1/completions            causal LMs (text.py)
    POST /v1/chat/completions       causal LMs, through the tokenizer's chat template (text.py)
    POST /v1/embeddings             encoders (encoder.py)
    POST /classify                  encoders with a seq-cls adapter (encoder.py)
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"}: a directory under --adapter-root
    POST /v1/unload_lora_adapter    {"lora_name"}: now, or when its in-flight requests end (also --adapter-root)
    GET  /metrics                   Prometheus

`"model"` in a request names an adapter, or the base (its directory's name, or "base"). Every error is an
OpenAI error body (protocol.py), a path this server does not serve included (its 404 says what the server
is and which routes it has); with an API key, every path but /health needs `Authorization: Bearer KEY`.
Around the routes, outermost first: the access log (access_log.py), the API key, the caller's middleware
(supervision, cancellation: launch.py), the body cap (limits.py).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import LoraError
from ..layers import check_adapter_name
from . import schemas
from .access_log import AccessLog
from .encoder import EncoderService
from .limits import BodyLimit, Limits
from .metrics import Metrics
from .protocol import APIError, LoadAdapterRequest, UnloadAdapterRequest, error_body, validation_message
from .registry import Registry, RegistryError, check_path
from .text import TextService

BASE_ALIAS = "base"
OPEN_PATHS = frozenset({"/health"})


def resolver(base_name: str, registry: Registry) -> Callable[[str], str | None]:
    """A request's "model" -> the adapter it names (None: the base); APIError 404 for anything else."""

    def resolve(model: str) -> str | None:
        if model in (base_name, BASE_ALIAS):
            return None
        if model in registry.names():
            return model
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server has {base_name!r} (or 'base') and the adapters "
            f"{registry.names()} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )

    return resolve


class BearerAuth:
    """ASGI middleware: every HTTP path but /health needs `Authorization: Bearer KEY` (401 otherwise)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the key, then pass the request on."""
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        body = error_body(401, "a valid API key is needed: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def build_app(
    service: TextService | EncoderService,
    *,
    base_name: str,
    model_dir: Path,
    metrics: Metrics,
    api_key: str | None = None,
    on_shutdown: Callable[[], None] | None = None,
    limits: Limits | None = None,
    access_log: Callable[[str], None] | None = None,
    log_format: str = "text",
    middleware: Sequence[Middleware] = (),
) -> FastAPI:
    """The app serving `service` (a causal LM through its engine, or an encoder); `on_shutdown` runs at exit.

    `limits` caps each request (limits.py); `access_log(line)` is called once per request (None: no log).
    `middleware` (the caller's: supervision, cancellation) wraps the routes inside the API key and the access log,
    so what it answers is logged and guarded like any route's answer.
    """
    lifespan = partial(_run_until_shutdown, on_shutdown=on_shutdown)
    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    kind = "an encoder model (embeddings, classification)" if isinstance(service, EncoderService) else "a causal LM"
    _errors(app, f"this server serves {base_name!r}, {kind}")
    _add_info_routes(app, base_name, model_dir, service.registry, metrics)
    _add_adapter_routes(app, base_name, service.registry)
    app.include_router(service.routes())
    _add_middleware(app, limits or Limits(), middleware, api_key, access_log, log_format)
    return app


@asynccontextmanager
async def _run_until_shutdown(app: FastAPI, *, on_shutdown: Callable[[], None] | None) -> AsyncIterator[None]:
    """The app's lifespan: serve, then run `on_shutdown` (off the event loop) at exit."""
    yield
    if on_shutdown is not None:
        await asyncio.to_thread(on_shutdown)


def _add_info_routes(app: FastAPI, base_name: str, model_dir: Path, registry: Registry, metrics: Metrics) -> None:
    """GET /health, /v1/models and /metrics."""
    created = int(time.time())

    @app.get("/health", responses={200: {"model": schemas.Health, "description": "ready"}, 503: schemas.ERRORS[503]})
    async def health() -> dict[str, str]:
        """Ready: the model is loaded and requests are served."""
        return {"status": "ready"}

    @app.get("/v1/models", responses=schemas.responses(schemas.ModelList))
    async def models() -> dict[str, Any]:
        """The base model and every adapter, as OpenAI lists models (with vLLM's root and parent, and each adapter's
        lineage: the base its lorakit.json records and whether it is the one served)."""
        return _model_list(base_name, model_dir, registry, created)

    @app.get("/metrics", responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}})
    async def prometheus() -> Response:
        """The Prometheus text exposition."""
        return Response(metrics.render(), media_type=metrics.content_type)


def _model_list(base_name: str, model_dir: Path, registry: Registry, created: int) -> dict[str, Any]:
    """GET /v1/models' body: the base (root: its directory) and each adapter (parent: the base; its lineage, from
    its lorakit.json: lineage.py)."""
    base = {
        "id": base_name,
        "object": "model",
        "created": created,
        "owned_by": "lorakit",
        "root": str(model_dir),
        "parent": None,
    }
    adapters = [
        {
            "id": n,
            "object": "model",
            "created": created,
            "owned_by": "lorakit",
            "root": str(registry.path(n)),
            "parent": base_name,
            "lineage": registry.lineage(n),  # None only while its first load runs
        }
        for n in registry.names()
    ]
    return {"object": "list", "data": [base, *adapters]}


def _add_adapter_routes(app: FastAPI, base_name: str, registry: Registry) -> None:
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's run-time adapter routes)."""

    @app.post("/v1/load_lora_adapter", responses=schemas.responses(schemas.AdapterLoaded))
    async def load_adapter(body: LoadAdapterRequest) -> dict[str, Any]:
        """Load an adapter directory under --adapter-root, strictly; a bad one is refused with the reason."""
        return await _load_adapter(registry, base_name, body)

    @app.post("/v1/unload_lora_adapter", responses=schemas.responses(schemas.AdapterUnloaded))
    async def unload_adapter(body: UnloadAdapterRequest) -> dict[str, Any]:
        """Unload an adapter now, or once the requests using it have finished (as load: with --adapter-root)."""
        return await _unload_adapter(registry, body)


async def _load_adapter(registry: Registry, base_name: str, body: LoadAdapterRequest) -> dict[str, Any]:
    """Check the name and the path, then load; APIError 400 with the reason for a bad name or adapter."""
    name = body.lora_name
    try:
        check_adapter_name(name)
    except ValueError as e:
        raise APIError(400, f"lora_name {name!r}: {e}", param="lora_name") from None
    if name in (base_name, BASE_ALIAS):
        raise APIError(400, f"lora_name {name!r} is the base model's name; pick another", param="lora_name")
    path = await asyncio.to_thread(check_path, registry.root, body.lora_path)
    try:
        await asyncio.to_thread(registry.add, name, path)
    except RegistryError:
        raise
    except (LoraError, ValueError, OSError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise APIError(400, f"the adapter {name!r} at {path} was not loaded: {e}", param="lora_path") from None
    return {"status": "loaded", "lora_name": name, "lora_path": str(path)}


async def _unload_adapter(registry: Registry, body: UnloadAdapterRequest) -> dict[str, Any]:
    """Unload now, or mark for unloading once its in-flight requests end (RegistryError 400 without a root)."""
    if registry.root is None:
        raise RegistryError(
            400, "unloading adapters at run time needs the server started with an adapter root (adapter_root)"
        )
    users = registry.users(body.lora_name)
    now = await asyncio.to_thread(registry.remove, body.lora_name)
    return {
        "status": "unloaded" if now else "unloading",
        "lora_name": body.lora_name,
        "in_flight": 0 if now else users,
    }


def _add_middleware(
    app: FastAPI,
    limits: Limits,
    middleware: Sequence[Middleware],
    api_key: str | None,
    access_log: Callable[[str], None] | None,
    log_format: str,
) -> None:
    """Around the routes, innermost first: the body cap, the caller's middleware, the API key, the access log."""
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)  # each add wraps the ones before it
    for m in middleware:
        app.add_middleware(m.cls, *m.args, **m.kwargs)
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)
    if access_log is not None:
        app.add_middleware(AccessLog, write=access_log, fmt=log_format)


def routes_of(app: FastAPI) -> list[str]:
    """ "METHOD /path" of every operation the app serves (its OpenAPI schema's)."""
    return [f"{method.upper()} {path}" for path, ops in app.openapi()["paths"].items() for method in ops]


def _errors(app: FastAPI, what: str) -> None:
    """Every error as an OpenAI error body; a 404 for a path this server lacks says `what` it serves and its routes."""

    async def answer(request: Request, e: Any) -> JSONResponse:
        """The error body and status of `e`."""
        if isinstance(e, APIError):
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        if isinstance(e, RegistryError):
            headers = {"Retry-After": "1"} if e.status == 429 else None
            return JSONResponse(error_body(e.status, str(e)), status_code=e.status, headers=headers)
        if isinstance(e, RequestValidationError):
            message, param = validation_message(list(e.errors()))
            return JSONResponse(error_body(400, message, param=param), status_code=400)
        if isinstance(e, HTTPException) and e.status_code == 404:
            message = f"{request.method} {request.url.path} is not served: {what}; its routes: {routes_of(app)}"
            return JSONResponse(error_body(404, message, code="route_not_found"), status_code=404)
        if isinstance(e, HTTPException):
            body = error_body(e.status_code, str(e.detail))
            return JSONResponse(body, status_code=e.status_code, headers=e.headers)
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)

    for kind in (APIError, RegistryError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, answer)
