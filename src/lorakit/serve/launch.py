"""Starting a server: load the model and its adapters (`create_app`), then run uvicorn until SIGTERM (`run`).

    app = create_app(ServeOptions(model=Path("models/qwen"), adapters=(("sql", Path("adapters/sql")),)))
    run(app, ServeOptions(...), on_ready=print)     # returns after SIGTERM, once in-flight requests are done

A causal LM is served through the continuous-batching engine (`Engine`); any other model (an encoder such as
all-MiniLM-L6-v2, or a model whose adapters are seq-cls) serves embeddings and classification. On SIGTERM the
server stops accepting connections, lets the requests in flight finish for up to `drain_timeout` seconds
(uvicorn's graceful shutdown, then the engine's `stop`), and `run` returns normally.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.middleware import Middleware

from ..errors import LoraError
from ..files.hub_cache import snapshot_of
from ..hf import models as hf
from ..ui.progress import Progress, quiet
from .access_log import FORMATS
from .app import build_app, resolver
from .disconnect import CancelOnDisconnect
from .limits import Limits
from .metrics import Metrics
from .registry import Registry
from .supervise import LINGER, EngineFailedError, FailedGate, Supervisor

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .engine import Engine

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
T = TypeVar("T")


@dataclass(frozen=True)
class ServeOptions:
    """What `lorakit serve` is told: the model, its adapters, where to listen, and the limits."""

    model: Path
    adapters: tuple[tuple[str, Path], ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 256
    max_loaded: int | None = None
    prefill_chunk: int = 512  # prompt tokens prefilled per engine turn, between the running rows' decode steps
    adapter_root: Path | None = None
    drain_timeout: float = 30.0
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    allow_base_mismatch: bool = False  # adapters load even onto a base other than their lorakit.json records
    limits: Limits = Limits()
    access_log: bool = True  # one line per request on stdout
    log_format: str = "text"  # or "json": one JSON object per line

    def __post_init__(self) -> None:
        if self.log_format not in FORMATS:
            raise ValueError(f"log_format={self.log_format!r} is not one of {', '.join(FORMATS)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty: give a key, or none to serve without one")
        for key in ("max_batch", "max_loaded", "prefill_chunk"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}={value} is invalid: expected >= 1")
        if self.max_queue < 0 or self.drain_timeout < 0 or not 0 <= self.port < 65536:
            raise ValueError(
                f"max_queue={self.max_queue}, drain_timeout={self.drain_timeout}, port={self.port}: "
                "expected max_queue >= 0, drain_timeout >= 0 and a port in 0..65535"
            )
        if self.adapter_root is not None and not Path(self.adapter_root).is_dir():
            raise ValueError(f"adapter_root={str(self.adapter_root)!r} is not a directory")


def model_kind(model_dir: Path, adapters: tuple[tuple[str, Path], ...]) -> str:
    """ "causal-lm" (served by the engine) or "encoder" (embeddings, classification): from the adapters' task,
    else from the model's architecture."""
    tasks = {}
    for name, path in adapters:
        try:
            tasks[name] = hf.read_task(path)[0]
        except (LoraError, ValueError, OSError) as e:
            raise ValueError(f"adapter {name!r} ({path}): {e}") from None
    if len(set(tasks.values())) > 1:
        raise ValueError(f"the adapters are for different tasks: {tasks}; one server serves one kind")
    if tasks:
        return "causal-lm" if set(tasks.values()) == {"causal-lm"} else "encoder"
    config = json.loads((hf.check_model_dir(model_dir) / "config.json").read_text(encoding="utf-8"))
    names = config.get("architectures") or []
    return "causal-lm" if any(n.endswith(CAUSAL_SUFFIXES) for n in names) else "encoder"


def create_app(options: ServeOptions, progress: Progress | None = None) -> FastAPI:
    """The app for `options`: the model loaded, every --adapter loaded (strictly), the engine started."""
    progress = progress or quiet()
    model_dir = hf.check_model_dir(options.model)
    kind = model_kind(model_dir, options.adapters)
    hub = snapshot_of(model_dir)  # a hub model is served under its id (ORG/NAME), as vLLM does, not its commit hash
    base_name = hub.repo_id if hub else model_dir.resolve().name
    metrics = Metrics()
    build = _text if kind == "causal-lm" else _encoder
    service, on_shutdown = build(options, model_dir, base_name, metrics, progress)
    for name, path in options.adapters:
        with progress.task(f"loading the adapter {name}={path}"):
            try:
                service.registry.add(name, Path(path))
            except Exception as e:
                raise ValueError(f"adapter {name!r} ({path}): {e}") from None
    supervisor = Supervisor()
    engine = getattr(service, "engine", None)
    if engine is not None:
        engine.on_failure = supervisor.fail
    app = build_app(
        service,
        base_name=base_name,
        model_dir=model_dir,
        metrics=metrics,
        api_key=options.api_key,
        on_shutdown=on_shutdown,
        limits=options.limits,
        access_log=_print_line if options.access_log else None,
        log_format=options.log_format,
        middleware=[Middleware(CancelOnDisconnect), Middleware(FailedGate, supervisor=supervisor)],
    )
    app.state.supervisor, app.state.engine, app.state.registry = supervisor, engine, service.registry
    return app


def _print_line(line: str) -> None:
    """An access-log line on stdout, flushed (uvicorn's access log goes to stdout too)."""
    print(line, file=sys.stdout, flush=True)


def _text(
    options: ServeOptions, model_dir: Path, base_name: str, metrics: Metrics, progress: Progress
) -> tuple[Any, Callable[[], None]]:
    """A causal LM, its engine (started) and registry."""
    from .text import TextService

    model, tok, engine = _text_engine(options, model_dir, metrics, progress)
    registry = _text_registry(options, model, engine, base_name, metrics)
    metrics.watch(running=lambda: engine.active, waiting=lambda: engine.queued + registry.waiting)
    context: Any = getattr(model.config, "max_position_embeddings", None) or getattr(tok, "model_max_length", 2048)
    embeddings: Any = model.get_input_embeddings()
    service = TextService(
        tokenizer=tok,
        engine=engine,
        registry=registry,
        metrics=metrics,
        resolve=resolver(base_name, registry),
        context=int(context),
        vocab_size=int(embeddings.weight.shape[0]),
        limits=options.limits,
    )
    engine.start()
    return service, lambda: engine.stop(timeout=min(options.drain_timeout, 5.0))


def _text_engine(
    options: ServeOptions, model_dir: Path, metrics: Metrics, progress: Progress
) -> tuple[Any, Any, Engine]:
    """The causal LM and its tokenizer, loaded (and moved to the device), and their engine (not started)."""
    from .engine import Engine

    with progress.task(f"loading the model {model_dir}"):
        model, tok = hf.load(model_dir, "causal-lm", dtype=options.dtype, trust_remote_code=options.trust_remote_code)
        if options.device:
            model.to(options.device)  # type: ignore[arg-type]  # transformers' to() typing takes a model
    engine = Engine(
        model,
        tok,
        max_batch=options.max_batch,
        max_queue=options.max_queue,
        on_step=metrics.step,
        on_finish=metrics.engine_finished,
        max_loaded=options.max_loaded,
        prefill_chunk=options.prefill_chunk,
    )
    return model, tok, engine


def _text_registry(options: ServeOptions, model: Any, engine: Engine, base_name: str, metrics: Metrics) -> Registry:
    """The adapter registry of a causal LM: loads and unloads run on the engine thread, between steps."""
    from ..adapters import delete_adapter, list_adapters
    from ..fingerprint import Fingerprints
    from ..loading import load_adapters
    from . import lineage

    def counted(fn: Callable[[], T]) -> Callable[[], T]:
        def run() -> T:
            out = fn()
            metrics.loaded.set(len(list_adapters(model)))
            return out

        return run

    fp = Fingerprints()  # the served base, hashed once for every adapter loaded onto it and for its lineage

    def load(name: str, path: Path) -> dict[str, Any]:
        task, _ = hf.read_task(path)
        if task != "causal-lm":
            raise ValueError(f"{path} is a {task} adapter; this server serves the causal LM {base_name}")
        allow = options.allow_base_mismatch

        def attach() -> dict[str, Any]:  # on the engine thread, between steps: no step reads the model meanwhile
            load_adapters(model, path, name=name, allow_base_mismatch=allow, fingerprints=fp)
            return lineage.describe(model, path, fp)  # the hashes the load's check took, kept in fp

        return engine.call(counted(attach))

    def unload(name: str) -> None:
        engine.call(counted(lambda: delete_adapter(model, name)))

    return Registry(
        load, unload, root=options.adapter_root, max_loaded=options.max_loaded, max_waiting=options.max_queue
    )


def _encoder(
    options: ServeOptions, model_dir: Path, base_name: str, metrics: Metrics, progress: Progress
) -> tuple[Any, Callable[[], None] | None]:
    """An encoder, its seq-cls adapters' models, and their registry."""
    import transformers

    from .encoder import EncoderService

    with progress.task(f"loading the model {model_dir}"):
        tok = hf.load_tokenizer(model_dir, trust_remote_code=options.trust_remote_code)
        base = transformers.AutoModel.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=options.trust_remote_code
        )
    service = EncoderService(
        model_dir=model_dir,
        base=base,
        tokenizer=tok,
        metrics=metrics,
        resolve=lambda m: None,
        allow_base_mismatch=options.allow_base_mismatch,
        limits=options.limits,
    )
    service.registry = Registry(service.load, service.unload, root=options.adapter_root, max_loaded=options.max_loaded)
    service.resolve = resolver(base_name, service.registry)
    return service, None


def run(app: FastAPI, options: ServeOptions, on_ready: Callable[[str], None]) -> None:
    """Serve `app` until SIGTERM or Ctrl-C; `on_ready(url)` once it listens (port 0: the port it was given).

    SIGTERM drains: no new connections, in-flight requests finish (up to drain_timeout; those cut then end with
    an OpenAI error, or a last error event and [DONE]), then this returns. Ctrl-C drains the same way and then
    raises KeyboardInterrupt, as Python's own handler would. If the engine fails, the server answers 503 for
    `supervise.LINGER` seconds, shuts down, and this raises `EngineFailedError`.
    """
    import asyncio

    import uvicorn

    supervisor: Supervisor | None = getattr(app.state, "supervisor", None)
    engine = getattr(app.state, "engine", None)

    class Server(uvicorn.Server):
        """uvicorn's server, saying when it listens, exiting when the engine fails, draining the engine on exit."""

        async def startup(self, sockets: Any = None) -> None:
            """Bind, then report the address."""
            await super().startup(sockets=sockets)
            if self.started:
                port = self.servers[0].sockets[0].getsockname()[1]
                on_ready(f"http://{options.host if ':' not in options.host else f'[{options.host}]'}:{port}")
            if supervisor is not None:
                loop = asyncio.get_running_loop()

                def exit_later() -> None:
                    loop.call_later(LINGER, setattr, self, "should_exit", True)

                supervisor.when_failed(lambda: loop.call_soon_threadsafe(exit_later))

        async def shutdown(self, sockets: Any = None) -> None:
            """Start the engine's drain (it ends what is left at drain_timeout), then uvicorn's."""
            if engine is not None:
                threading.Thread(target=engine.stop, args=(options.drain_timeout,), daemon=True).start()
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level="warning",
        log_config=None,
        access_log=False,
        # the engine ends what is left at drain_timeout; the margin lets those answers reach their clients
        timeout_graceful_shutdown=math.ceil(options.drain_timeout) + 5,
        lifespan="on",
    )
    # uvicorn re-raises the signal it caught once it has shut down, under the handler installed before it:
    # for SIGTERM that is this no-op, so that a drained shutdown is a normal return (exit 0), not a kill.
    previous = signal.signal(signal.SIGTERM, _ignore)
    try:
        Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if supervisor is not None and supervisor.reason is not None:
        raise EngineFailedError(f"the engine failed ({supervisor.reason}); restart the server")


def _ignore(signum: int, frame: FrameType | None) -> None:
    """A signal handler that does nothing."""
