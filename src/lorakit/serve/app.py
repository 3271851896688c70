"""The FastAPI app of `lorakit serve`: one local model and its adapters behind OpenAI's API (and vLLM's extras).

    GET  /health                    {"status": "ready"} (never needs the API key)
    GET  /v1/models                 the base model and every adapter
    POST /v1/completions            causal LMs (text.py)
    POST /v1/chat/completions       causal LMs, through the tokenizer's chat template (text.py)
    POST /v1/embeddings             encoders (encoder.py)
    POST /classify                  encoders with a seq-cls adapter (encoder.py)
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"}: a directory under --adapter-root
    POST /v1/unload_lora_adapter    {"lora_name"}: now, or when its in-flight requests end
    GET  /metrics                   Prometheus

`"model"` in a request names an adapter, or the base (its directory's name, or "base"). Every error is an
OpenAI error body (protocol.py); with an API key, every path but /health needs `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import LoraError
from ..layers import check_adapter_name
from .encoder import EncoderService
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
) -> FastAPI:
    """The app serving `service` (a causal LM through its engine, or an encoder); `on_shutdown` runs at exit."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if on_shutdown is not None:
            await asyncio.to_thread(on_shutdown)

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    registry = service.registry
    created = int(time.time())
    _errors(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Ready: the model is loaded and requests are served."""
        return {"status": "ready"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The base model and every adapter, as OpenAI lists models (with vLLM's root and parent)."""
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
            }
            for n in registry.names()
        ]
        return {"object": "list", "data": [base, *adapters]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        """The Prometheus text exposition."""
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest) -> dict[str, Any]:
        """Load an adapter directory under --adapter-root, strictly; a bad one is refused with the reason."""
        name = body.lora_name
        try:
            check_adapter_name(name)
        except ValueError as e:
            raise APIError(400, f"lora_name {name!r}: {e}", param="lora_name") from None
        if name in (base_name, BASE_ALIAS):
            raise APIError(400, f"lora_name {name!r} is the base model's name; pick another", param="lora_name")
        path = check_path(registry.root, body.lora_path)
        try:
            await asyncio.to_thread(registry.add, name, path)
        except (LoraError, ValueError, OSError, KeyError, TypeError) as e:
            raise APIError(400, f"the adapter {name!r} at {path} was not loaded: {e}", param="lora_path") from None
        return {"status": "loaded", "lora_name": name, "lora_path": str(path)}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest) -> dict[str, Any]:
        """Unload an adapter now, or once the requests using it have finished."""
        users = registry.users(body.lora_name)
        now = await asyncio.to_thread(registry.remove, body.lora_name)
        return {
            "status": "unloaded" if now else "unloading",
            "lora_name": body.lora_name,
            "in_flight": 0 if now else users,
        }

    app.include_router(service.routes())
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)
    return app


def _errors(app: FastAPI) -> None:
    """Every error as an OpenAI error body."""

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
        if isinstance(e, HTTPException):
            return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code)
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)

    for kind in (APIError, RegistryError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, answer)
