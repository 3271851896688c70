"""A client that closes its connection before its answer is complete cancels its request.

Starlette notices a closed connection only while it streams; a non-streaming handler would go on waiting for the
engine, which would go on decoding for nobody until max_tokens. This ASGI middleware reads the connection once the
handler has read the request body, and cancels the handler when the client leaves: the handler's `finally`
cancels its engine requests (`Handle.cancel`), whose slots free at the engine's next step. The handler still
sees `http.disconnect` through `receive`, as it would without the middleware.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class CancelOnDisconnect:
    """ASGI middleware: cancel the handler of a request whose client has gone before the response was sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the handler, watching the connection once the body is in."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_read, gone = asyncio.Event(), asyncio.Event()
        sent = False

        async def app_receive() -> Message:
            if body_read.is_set():  # the watcher owns the connection now: hand on what it sees
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def app_send(message: Message) -> None:
            nonlocal sent
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                sent = True
            await send(message)

        async def run() -> None:
            await self.app(scope, app_receive, app_send)

        handler = asyncio.create_task(run())

        async def watch() -> None:
            await body_read.wait()
            message = await receive()  # returns at a disconnect, or once the response is complete
            if message["type"] == "http.disconnect":
                gone.set()
                if not sent:
                    handler.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await handler
        except asyncio.CancelledError:
            if not gone.is_set():  # cancelled from outside (server shutdown), not by the watcher: pass it on
                raise
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if not handler.done():
                handler.cancel()
