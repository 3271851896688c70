"""The server's side of engine supervision: once the engine has failed, every answer says so and the process exits.

    supervisor = Supervisor()
    engine.on_failure = supervisor.fail           # the engine thread reports why its loop stopped
    app.add_middleware(FailedGate, supervisor=supervisor)

After a failure, `GET /health` answers 503 `{"status": "failed", "reason": ...}` and every other path 503 with an
OpenAI error body (requests in flight were already ended by the engine, and get 503 from their handler); after
`LINGER` seconds (long enough for a probe or a load balancer to see the 503) the server shuts down and `launch.run`
raises `EngineFailedError`, so `lorakit serve` exits 1 and a supervisor (systemd's Restart=on-failure, a container
runtime's restart policy) starts a fresh process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .protocol import error_body

LINGER = 2.0  # seconds between an engine failure and the shutdown it causes


class EngineFailedError(RuntimeError):
    """The engine stopped on an error and the server shut down: the process must be restarted."""


class Supervisor:
    """Whether the engine is healthy, and what to do when it is not."""

    def __init__(self) -> None:
        self.reason: str | None = None  # why the engine failed; None while it is healthy
        self._lock = threading.Lock()
        self._on_failure: list[Callable[[], object]] = []

    def fail(self, reason: str) -> None:
        """The engine's `on_failure` (any thread): note why, then run what `when_failed` asked for."""
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            todo = list(self._on_failure)
        for fn in todo:
            fn()

    def when_failed(self, fn: Callable[[], object]) -> None:
        """Run `fn` (from any thread) when the engine fails; at once if it has already."""
        with self._lock:
            failed = self.reason is not None
            if not failed:
                self._on_failure.append(fn)
        if failed:
            fn()


class FailedGate:
    """ASGI middleware: nothing while the engine is healthy; once it has failed, 503 on every path, /health too."""

    def __init__(self, app: ASGIApp, supervisor: Supervisor) -> None:
        self.app, self.supervisor = app, supervisor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, or answer 503 with the reason."""
        reason = self.supervisor.reason
        if scope["type"] != "http" or reason is None:
            return await self.app(scope, receive, send)
        message = f"the engine has failed ({reason}); the server is shutting down to be restarted"
        body = error_body(503, message, code="engine_failed")
        if scope["path"] == "/health":
            body = {"status": "failed", "reason": reason, **body}
        await JSONResponse(body, status_code=503, headers={"Retry-After": "5"})(scope, receive, send)
