"""`lorakit serve` scaled out with Ray Serve: replicas each holding the base model and an engine, adapters placed on
them by Ray's model multiplexing, behind one OpenAI-compatible ingress (needs the `ray` extra: `ray[serve]`).

    from ray import serve
    from lorakit.serve.ray_serve import build_app

    app = build_app("models/llama", adapters={"sql": "adapters/sql", "chat": "adapters/chat"}, replicas=2)
    serve.run(app)      # http://127.0.0.1:8000/v1/completions, /v1/chat/completions, /v1/models, /health

or from the shell, with Ray's own CLI (arguments as key=value; adapters as name=path pairs joined by commas):

    serve run lorakit.serve.ray_serve:app_builder model=models/llama adapters=sql=adapters/sql,chat=adapters/chat

The ingress reads each request's `"model"`: an adapter's name goes to the replicas with
`.options(multiplexed_model_id=name)`, so Ray sends it to a replica that already holds that adapter (loading it on
the replica with the fewest adapters when none does); the base name (or "base") goes to any replica. A replica
loads an adapter through `@serve.multiplexed` (at most `adapters_per_replica`, least recently used evicted) and
answers with lorakit's own app in process (`asgi_call`): the same routes, request checks, streaming, continuous
batching of every adapter it holds, and error bodies as `lorakit serve`. Each answer names its replica in the
`x-lorakit-replica` header, and the adapter loads that replica has made so far in `x-lorakit-adapter-loads`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..files.hub_cache import snapshot_of
from .app import BASE_ALIAS
from .asgi_call import Answer, call
from .protocol import error_body

FORWARDED = frozenset({("POST", "/v1/completions"), ("POST", "/v1/chat/completions")})
REPLICA_HEADER, LOADS_HEADER = "x-lorakit-replica", "x-lorakit-adapter-loads"
DROPPED = frozenset({"content-length", "transfer-encoding"})  # the ingress streams the body again


class AdapterReplica:
    """One replica: the base model and its engine (lorakit's app, in process), and the adapters Ray placed here.

    Ray's multiplexing decides which adapters a replica holds; the registry of lorakit's app loads them onto the
    model. An adapter Ray evicts while requests still use it is unloaded once the last of them has finished.
    """

    def __init__(self, model_dir: str, adapters: Mapping[str, str], per_replica: int, options: Mapping[str, Any]):
        from .launch import ServeOptions, create_app

        self.paths = {name: Path(path) for name, path in adapters.items()}
        self.app = create_app(ServeOptions(model=Path(model_dir), access_log=False, **options))
        self.registry = self.app.state.registry
        self.engine = self.app.state.engine
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.loads = 0
        self.stale: set[str] = set()  # evicted by Ray while in use: unloaded once idle
        self.stale_lock = threading.Lock()  # Ray evicts from a worker thread
        self.books = asyncio.Lock()  # loads, holds and unloads of adapters, in the order they were asked

        async def load(name: str) -> _Held:
            return await self._load(name)

        self.adapter = serve.multiplexed(max_num_models_per_replica=per_replica)(load)

    async def _load(self, name: str) -> _Held:
        """Load `name` onto the model (Ray's multiplexed loader); what Ray keeps for it until it evicts it."""
        if name not in self.paths:
            raise ValueError(f"no adapter named {name!r}; this deployment serves {sorted(self.paths)}")
        async with self.books:
            with self.stale_lock:
                self.stale.discard(name)
            if name not in self.registry.names():
                await asyncio.to_thread(self.registry.add, name, self.paths[name])
                self.loads += 1
        return _Held(self, name)

    def evicted(self, name: str) -> None:
        """Ray dropped `name` from this replica's adapters: it is unloaded at the next request that finds it idle."""
        with self.stale_lock:
            self.stale.add(name)

    async def _hold(self, name: str) -> None:
        """Make sure `name` is loaded here and hold it for one request; unload the evicted adapters now idle."""
        await self.adapter(name)  # Ray's books: used now (loaded first if Ray had none here)
        async with self.books:
            with self.stale_lock:
                idle = [n for n in self.stale if n != name and self.registry.users(n) == 0]
                self.stale.difference_update(idle)
            for stale in idle:
                await asyncio.to_thread(self.registry.remove, stale)
            if name not in self.registry.names():  # evicted and unloaded between Ray's load and here
                await asyncio.to_thread(self.registry.add, name, self.paths[name])
                self.loads += 1
            await asyncio.to_thread(self.registry.acquire, name)

    async def forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> AsyncIterator[Answer | bytes]:
        """Answer one request with lorakit's app: an `Answer` (with this replica's headers), then the body."""
        name = serve.get_multiplexed_model_id()
        if name:
            await self._hold(name)
        try:
            async for part in call(self.app, method, path, headers, body):
                if isinstance(part, Answer):
                    mine = ((REPLICA_HEADER, self.replica_id), (LOADS_HEADER, str(self.loads)))
                    part = Answer(part.status, part.headers + mine)
                yield part
        finally:
            if name:
                await asyncio.to_thread(self.registry.release, name)

    def __del__(self) -> None:
        """Ray Serve shuts the replica down: stop the engine (requests in flight end first, up to 5 s)."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop(timeout=5.0)


class _Held:
    """What Ray's multiplexing keeps for an adapter on a replica: its `__del__` is Ray's eviction."""

    def __init__(self, replica: AdapterReplica, name: str) -> None:
        self.replica, self.name, self.evicted = replica, name, False

    def __del__(self) -> None:
        """Evicted by Ray: the replica unloads the adapter once no request uses it (once; Python's own collection
        of the object later is no second eviction)."""
        if not self.evicted:
            self.evicted = True
            self.replica.evicted(self.name)


class OpenAIIngress:
    """The HTTP entry: OpenAI's text routes forwarded to a replica chosen by the request's `"model"`."""

    def __init__(self, replicas: DeploymentHandle, base_name: str, model_dir: str, adapters: Mapping[str, str]):
        self.replicas, self.base_name, self.model_dir = replicas, base_name, model_dir
        self.adapters = dict(adapters)

    async def __call__(self, request: Request) -> Response:
        """Route one HTTP request: the text endpoints to a replica, /v1/models and /health here."""
        key = (request.method, request.url.path)
        if key == ("GET", "/health"):
            return JSONResponse({"status": "ready"})
        if key == ("GET", "/v1/models"):
            return JSONResponse(self.models())
        if key not in FORWARDED:
            routes = sorted(f"{m} {p}" for m, p in FORWARDED | {("GET", "/health"), ("GET", "/v1/models")})
            message = f"{request.method} {request.url.path} is not served: a Ray Serve deployment of lorakit; {routes}"
            return JSONResponse(error_body(404, message, code="route_not_found"), status_code=404)
        body = await request.body()
        model = _model_of(body)
        if model not in (None, self.base_name, BASE_ALIAS) and model not in self.adapters:
            message = (
                f"the model {model!r} does not exist; this deployment has {self.base_name!r} (or 'base') and the "
                f"adapters {sorted(self.adapters)} (GET /v1/models)"
            )
            return JSONResponse(error_body(404, message, param="model", code="model_not_found"), status_code=404)
        adapter = model if model in self.adapters else ""  # "": no adapter, any replica
        handle = self.replicas.options(multiplexed_model_id=adapter, stream=True)
        args = (request.method, request.url.path, list(request.headers.items()), body)
        parts: DeploymentResponseGenerator[Any] = handle.forward.remote(*args)  # type: ignore[assignment]  # stream=True
        start = await parts.__anext__()
        assert isinstance(start, Answer), "a replica answers with the status first"
        headers = {k: v for k, v in start.headers if k not in DROPPED}
        return StreamingResponse(_rest(parts), status_code=start.status, headers=headers)

    def models(self) -> dict[str, Any]:
        """GET /v1/models: the base and every adapter of the deployment (vLLM's root and parent)."""
        card = {"object": "model", "created": 0, "owned_by": "lorakit"}
        base = {"id": self.base_name, **card, "root": self.model_dir, "parent": None}
        adapters = [{"id": n, **card, "root": p, "parent": self.base_name} for n, p in self.adapters.items()]
        return {"object": "list", "data": [base, *adapters]}


async def _rest(parts: Any) -> AsyncIterator[bytes]:
    """The body pieces a replica streams after its `Answer`."""
    async for part in parts:
        yield part


def _model_of(body: bytes) -> str | None:
    """The request's "model" (None where the body is not a JSON object with a string there: the replica says why)."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    model = value.get("model") if isinstance(value, dict) else None
    return model if isinstance(model, str) else None


def build_app(
    model_dir: str | Path,
    adapters: Mapping[str, str | Path] | None = None,
    *,
    replicas: int = 2,
    adapters_per_replica: int = 4,
    ray_actor_options: Mapping[str, Any] | None = None,
    **serve_options: Any,
) -> serve.Application:
    """The Ray Serve application: `replicas` copies of the model behind one OpenAI-compatible ingress.

    Args:
        model_dir: the base model's directory (as `lorakit serve --model`).
        adapters: name -> adapter directory; any of them can be asked for, each placed on replicas by Ray.
        replicas: how many replicas (each a process with its own copy of the base).
        adapters_per_replica: how many adapters one replica holds at most (`max_num_models_per_replica`).
        ray_actor_options: each replica's resources, e.g. `{"num_cpus": 2}` or `{"num_gpus": 1}`.
        **serve_options: `ServeOptions` fields for each replica's server: max_batch, max_queue, dtype, device,
            allow_base_mismatch, limits, ...

    Returns:
        The application, for `serve.run(app)` (or `serve run` through `app_builder`).

    Raises:
        ValueError: a missing model or adapter directory, or replicas / adapters_per_replica below 1.
    """
    model = Path(model_dir).resolve()
    found = {name: str(Path(path).resolve()) for name, path in (adapters or {}).items()}
    missing = [str(p) for p in (model, *map(Path, found.values())) if not p.is_dir()]
    if missing or replicas < 1 or adapters_per_replica < 1:
        raise ValueError(
            f"replicas={replicas}, adapters_per_replica={adapters_per_replica} (expected >= 1); "
            f"directories not found: {missing or 'none'}"
        )
    hub = snapshot_of(model)  # served under the name `lorakit serve` gives it
    base_name = hub.repo_id if hub else model.name
    options = {"max_loaded": None, **serve_options}
    replica = serve.deployment(
        name="LoraReplica", num_replicas=replicas, ray_actor_options=dict(ray_actor_options or {"num_cpus": 1})
    )(AdapterReplica)
    bound = replica.bind(str(model), found, adapters_per_replica, options)
    ingress = serve.deployment(name="OpenAIIngress", ray_actor_options={"num_cpus": 0})(OpenAIIngress)
    return ingress.bind(bound, base_name, str(model), found)


def app_builder(args: dict[str, str]) -> serve.Application:
    """`serve run lorakit.serve.ray_serve:app_builder model=DIR adapters=NAME=DIR,... replicas=2
    adapters_per_replica=4`: `build_app` from Ray's key=value arguments."""
    known = {"model", "adapters", "replicas", "adapters_per_replica"}
    unknown = sorted(set(args) - known)
    if unknown or "model" not in args:
        raise ValueError(f"arguments {unknown or 'none'} are unknown, or model= is missing; expected {sorted(known)}")
    pairs = [p for p in args.get("adapters", "").split(",") if p]
    if any("=" not in p for p in pairs):
        raise ValueError(f"adapters={args['adapters']!r}: expected NAME=DIR pairs joined by commas")
    return build_app(
        args["model"],
        dict(p.split("=", 1) for p in pairs),
        replicas=int(args.get("replicas", 2)),
        adapters_per_replica=int(args.get("adapters_per_replica", 4)),
    )
