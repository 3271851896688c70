"""Bounded work per request: caps on the body, the prompt and the stop strings, each refusal naming its limit.

    limits = Limits(max_body_bytes=8 * 2**20, max_prompt_chars=1_000_000, max_stops=4, max_stop_chars=256)
    app = BodyLimit(app, limits.max_body_bytes)     # 413 before a byte too many is read
    limits.check_completion(body)                   # 400 naming the cap, before any tokenizing

A body over the cap is refused from its Content-Length header before any of it is read, or, sent in chunks,
as soon as the bytes read pass the cap: the server never holds more than the cap. Prompt characters and the
stop strings are counted before the prompt is tokenized (cheap, on the event loop); prompt tokens are counted
after (in the worker thread that tokenizes). Every refusal names the limit as `ServeOptions` and `Limits` call it
(`max_body_bytes`; `lorakit serve --max-body-bytes` sets it), so an operator who wants bigger requests knows what
to change.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from .protocol import APIError, error_body

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from .protocol import ChatRequest, CompletionRequest


@dataclass(frozen=True)
class Limits:
    """The per-request caps of a server (`lorakit serve --max-body-bytes ...`).

    Attributes:
        max_body_bytes: the largest request body (413 over it).
        max_prompt_chars: characters of all prompts of a request (a chat: of all its messages' text).
        max_prompt_tokens: tokens of one prompt; None: the model's context is the only cap.
        max_stops: stop strings in one request (OpenAI allows 4).
        max_stop_chars: characters of one stop string.

    Examples:
        >>> Limits(max_stops=0)
        Traceback (most recent call last):
        ...
        ValueError: max_stops=0 is invalid: expected an int >= 1
    """

    max_body_bytes: int = 8 * 2**20
    max_prompt_chars: int = 1_000_000
    max_prompt_tokens: int | None = None
    max_stops: int = 4
    max_stop_chars: int = 256

    def __post_init__(self) -> None:
        for key in ("max_body_bytes", "max_prompt_chars", "max_prompt_tokens", "max_stops", "max_stop_chars"):
            value = getattr(self, key)
            if value is None and key == "max_prompt_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} is invalid: expected an int >= 1")

    def check_completion(self, body: CompletionRequest) -> None:
        """APIError 400 if the prompts' characters (or one prompt's token ids) or the stops pass their caps."""
        self.check_stops(body.stops())
        given = body.prompt
        prompts = [given] if isinstance(given, str) or (given and isinstance(given[0], int)) else given
        chars = 0
        for p in prompts:
            if isinstance(p, str):
                chars += len(p)
            else:
                self.check_prompt_tokens(len(p), "prompt")
        self.check_prompt_chars(chars, "prompt")

    def check_chat(self, body: ChatRequest) -> None:
        """APIError 400 if the messages' text or the stops pass their caps."""
        self.check_stops(body.stops())
        chars = 0
        for m in body.messages:
            parts = [m.content] if isinstance(m.content, str) else [p.get("text") for p in m.content]
            chars += len(m.role) + sum(len(t) for t in parts if isinstance(t, str))
        self.check_prompt_chars(chars, "messages")

    def check_texts(self, texts: Iterable[object], param: str = "input") -> None:
        """APIError 400 if the texts of an embeddings or classify request pass --max-prompt-chars."""
        self.check_prompt_chars(sum(len(t) for t in texts if isinstance(t, str)), param)

    def check_prompt_chars(self, chars: int, param: str) -> None:
        """APIError 400 if `chars` passes max_prompt_chars."""
        if chars > self.max_prompt_chars:
            raise APIError(
                400,
                f"{param} is {chars} characters, over this server's limit of {self.max_prompt_chars} "
                "(max_prompt_chars)",
                param=param,
                code="prompt_too_long",
            )

    def check_prompt_tokens(self, tokens: int, param: str) -> None:
        """APIError 400 if one prompt's `tokens` pass max_prompt_tokens."""
        if self.max_prompt_tokens is not None and tokens > self.max_prompt_tokens:
            raise APIError(
                400,
                f"{param} is {tokens} tokens, over this server's limit of {self.max_prompt_tokens} (max_prompt_tokens)",
                param=param,
                code="prompt_too_long",
            )

    def check_stops(self, stops: tuple[str, ...]) -> None:
        """APIError 400 if there are more stop strings than max_stops, or one is longer than max_stop_chars."""
        if len(stops) > self.max_stops:
            raise APIError(
                400,
                f"stop has {len(stops)} strings, over this server's limit of {self.max_stops} (max_stops)",
                param="stop",
            )
        longest = max((len(s) for s in stops), default=0)
        if longest > self.max_stop_chars:
            raise APIError(
                400,
                f"a stop string is {longest} characters, over this server's limit of {self.max_stop_chars} "
                "(max_stop_chars)",
                param="stop",
            )


def too_large(limit: int) -> str:
    """The message of a 413."""
    return f"the request body is over this server's limit of {limit} bytes (max_body_bytes)"


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is a 413, refused before more than `limit` bytes are read."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse by Content-Length at once; otherwise count the body's bytes as the app reads them."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.strip().isdigit() or int(declared) > self.limit):
            body = error_body(413, too_large(self.limit), code="body_too_large")
            response = JSONResponse(body, status_code=413, headers={"Connection": "close"})
            return await response(scope, receive, send)
        read = 0

        async def counted() -> Message:
            """The next body chunk; HTTPException 413 once the body passes the limit (answered by the app)."""
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.limit:
                    raise HTTPException(413, too_large(self.limit), headers={"Connection": "close"})
            return message

        await self.app(scope, counted, send)
