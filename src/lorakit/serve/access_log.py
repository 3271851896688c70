"""One access-log line per HTTP request, written when its response has ended (a stream: after `[DONE]`).

    127.0.0.1:50312 "POST /v1/completions" 200 adapter=sql prompt_tokens=5 completion_tokens=16 ttft=0.012s total=0.210s

or, with `--log-format json`, one JSON object per line with the same fields:

    {"client": "127.0.0.1:50312", "method": "POST", "path": "/v1/completions", "status": 200, "adapter": "sql",
     "prompt_tokens": 5, "completion_tokens": 16, "ttft_s": 0.012, "total_s": 0.21}

The middleware puts an `AccessRecord` in the request's ASGI scope (`record_of(request)`); the handlers fill in
what only they know (the adapter, token counts, the first token's time). Fields a request has no value for
(the adapter of GET /metrics, the first token of a refused request) are `-` in text and null in JSON.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

SCOPE_KEY = "lorakit.access"
FORMATS = ("text", "json")


@dataclass
class AccessRecord:
    """What a request's handler knows for its access line; `started` is when the request arrived."""

    started: float = field(default_factory=time.perf_counter)
    adapter: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_at: float | None = None

    def first_token(self) -> None:
        """Note the first token's time (later calls keep the first)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()


def record_of(request: Request) -> AccessRecord:
    """The request's AccessRecord (a fresh one, not logged, when no AccessLog wraps the app)."""
    found = request.scope.get(SCOPE_KEY)
    return found if isinstance(found, AccessRecord) else AccessRecord()


def line(fields: dict[str, Any], fmt: str) -> str:
    """One access line of `fields` in `fmt` ("text" or "json").

    Examples:
        >>> line({"client": "c:1", "method": "GET", "path": "/health", "status": 200, "adapter": None,
        ...       "prompt_tokens": None, "completion_tokens": None, "ttft_s": None, "total_s": 0.0012}, "text")
        'c:1 "GET /health" 200 adapter=- prompt_tokens=- completion_tokens=- ttft=- total=0.001s'
    """
    if fmt == "json":
        return json.dumps(fields)

    def show(value: Any, seconds: bool = False) -> str:
        return "-" if value is None else f"{value:.3f}s" if seconds else str(value)

    return (
        f'{fields["client"]} "{fields["method"]} {fields["path"]}" {fields["status"]} '
        f"adapter={show(fields['adapter'])} prompt_tokens={show(fields['prompt_tokens'])} "
        f"completion_tokens={show(fields['completion_tokens'])} ttft={show(fields['ttft_s'], True)} "
        f"total={show(fields['total_s'], True)}"
    )


class AccessLog:
    """ASGI middleware: `write(line)` once per HTTP request, after its response's last byte (or its failure)."""

    def __init__(self, app: ASGIApp, *, write: Callable[[str], None], fmt: str = "text") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
        self.app, self.write, self.fmt = app, write, fmt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request, watching its response's status; write the line when it has ended."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record = AccessRecord()
        scope[SCOPE_KEY] = record
        status = 500  # what the server answers if the app fails before it starts a response

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            self.write(line(self.fields(scope, record, status), self.fmt))

    @staticmethod
    def fields(scope: Scope, record: AccessRecord, status: int) -> dict[str, Any]:
        """The fields of one request's line."""
        client = scope.get("client")
        first = record.first_token_at
        return {
            "client": f"{client[0]}:{client[1]}" if client else "-",
            "method": scope.get("method", "-"),
            "path": scope.get("path", "-"),
            "status": status,
            "adapter": record.adapter,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "ttft_s": None if first is None else round(first - record.started, 6),
            "total_s": round(time.perf_counter() - record.started, 6),
        }
