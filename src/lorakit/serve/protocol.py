"""The wire format: OpenAI-compatible request bodies (pydantic, checked strictly) and OpenAI-style error bodies.

A request field of the wrong type (`"max_tokens": "5"`) is a 400 naming the field, as OpenAI's API answers it;
fields this server does not know are ignored, so clients that send more (the `openai` client's extras, vLLM's
sampling extensions) still work. Every error, whatever raised it, reaches the client as

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered to the client: HTTP status, message, the request field at fault, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The OpenAI error body.

        Examples:
            >>> APIError(404, "no model 'x'", param="model").body()["error"]["type"]
            'not_found_error'
        """
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """`{"error": {message, type, param, code}}` for an HTTP status."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for pydantic's errors of a request body: the first one, named by its field path."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({reason})".replace(" ()", ""), None
    param = ".".join(loc) or None
    got = first.get("input")
    shown = "" if param is None or isinstance(got, dict) else f" (got {got!r})"[:80]
    where = f"field {param!r}" if param else "the request body"
    more = f"; and {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{shown}{more}", param


DONE = "data: [DONE]\n\n"  # the last server-sent event of a stream


def event(data: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object.

    Examples:
        >>> event({"a": 1})
        'data: {"a": 1}\\n\\n'
    """
    return f"data: {json.dumps(data)}\n\n"


class _Request(BaseModel):
    """Strict types (no "5" for 5), unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    """`stream_options`: with include_usage, a last chunk carries the usage counts."""

    include_usage: bool = False


class _Sampling(_Request):
    """The sampling fields shared by completions and chat completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # vLLM's extension: 0 or -1 samples from every token
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        """No empty stop strings: they would end every completion at once."""
        if value is not None and any(s == "" for s in ([value] if isinstance(value, str) else value)):
            raise ValueError("stop strings must not be empty")
        return value

    def stops(self) -> tuple[str, ...]:
        """`stop` as a tuple."""
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """`POST /v1/completions`: one prompt or several, as text or token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions


class ChatMessage(_Request):
    """One message; content as a string or as OpenAI's list of text parts."""

    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[dict[str, Any]]

    def text(self, i: int) -> str:
        """The content as one string; ValueError for parts that are not text."""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{i}].content[{j}]: only text parts are supported; got {part.get('type')!r}")
            texts.append(part["text"])
        return "".join(texts)


class ChatRequest(_Sampling):
    """`POST /v1/chat/completions`: a conversation, rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)


class EmbeddingRequest(_Request):
    """`POST /v1/embeddings`: one text or several."""

    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 (the openai client's)

    def texts(self) -> list[str]:
        """`input` as a list."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ClassifyRequest(_Request):
    """`POST /classify`: one text or several, through a sequence-classification adapter."""

    model: str
    input: str | list[str]

    def texts(self) -> list[str]:
        """`input` as a list."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


class LoadAdapterRequest(_Request):
    """`POST /v1/load_lora_adapter` (vLLM's name and fields)."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(_Request):
    """`POST /v1/unload_lora_adapter` (vLLM's name and fields)."""

    lora_name: str = Field(min_length=1)
