"""One HTTP request through an ASGI app in this process, its answer read as it comes: the status line and headers
first, then each piece of the body (a stream's events one by one).

    async for part in call(app, "POST", "/v1/completions", [("content-type", "application/json")], body):
        ...   # an Answer(status, headers) first, then bytes

Used where lorakit's own app answers requests that arrive by another road than a socket (a Ray Serve replica),
so that every route, check and error body is the one `lorakit serve` has. Closing the iteration early is the
client going away: the app is told (`http.disconnect`), as a socket's close would tell it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message


@dataclass(frozen=True)
class Answer:
    """The start of an answer: its status and headers (names lower-case)."""

    status: int
    headers: tuple[tuple[str, str], ...]


def _scope(method: str, path: str, headers: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """An ASGI HTTP scope for `method path` (a query string after "?") with `headers`."""
    route, _, query = path.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method.upper(),
        "scheme": "http",
        "path": route,
        "raw_path": route.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }


async def call(
    app: ASGIApp, method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes
) -> AsyncIterator[Answer | bytes]:
    """The answer of `app` to one request: an `Answer`, then the body's pieces; the app's error if it raises."""
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()  # the request has no more body: the next message is the client leaving
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(_scope(method, path, headers), receive, messages.put)
        finally:
            messages.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                pairs = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", []))
                yield Answer(int(message["status"]), pairs)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
    finally:
        gone.set()  # read to the end, or the caller stopped reading: either way the client is done
        await task  # the app's own error, if it raised one
