"""The responses of `lorakit serve`, as pydantic models: they make the OpenAPI schema (GET /openapi.json) say
what each endpoint really answers, status by status, so a client generator or a fuzzer can check it.

The handlers build plain dicts (cheap); these models only document them (`responses=` of each route), and the
schemathesis run of the tests checks every answer against them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, RootModel


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error answer: `{"error": {...}}`."""

    error: ErrorDetail


class Health(BaseModel):
    """GET /health."""

    status: str


class ModelCard(BaseModel):
    """One model of GET /v1/models (with vLLM's root and parent)."""

    id: str
    object: str
    created: int
    owned_by: str
    root: str
    parent: str | None


class ModelList(BaseModel):
    """GET /v1/models."""

    object: str
    data: list[ModelCard]


class Usage(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    """One choice of a completion."""

    index: int
    text: str
    logprobs: None
    finish_reason: str | None


class Completion(BaseModel):
    """POST /v1/completions without stream (with stream: server-sent events of the same choices)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    """The assistant's message of a chat choice."""

    role: str
    content: str


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    """POST /v1/chat/completions without stream."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class InputUsage(BaseModel):
    """Token counts of an encoder request (it generates nothing)."""

    prompt_tokens: int
    total_tokens: int


class Embedding(BaseModel):
    """One embedding: floats, or base64 of little-endian float32."""

    object: str
    index: int
    embedding: list[float] | str


class Embeddings(BaseModel):
    """POST /v1/embeddings."""

    object: str
    data: list[Embedding]
    model: str
    usage: InputUsage


class Classification(BaseModel):
    """One text's label and every label's probability."""

    index: int
    label: str
    probabilities: dict[str, float]


class Classifications(BaseModel):
    """POST /classify."""

    object: str
    data: list[Classification]
    model: str
    usage: InputUsage


class AdapterLoaded(BaseModel):
    """POST /v1/load_lora_adapter."""

    status: str
    lora_name: str
    lora_path: str


class AdapterUnloaded(BaseModel):
    """POST /v1/unload_lora_adapter: "unloaded", or "unloading" once its requests in flight have ended."""

    status: str
    lora_name: str
    in_flight: int


class LoraAdapterCard(BaseModel):
    """One adapter of GET /lora-adapters (llama.cpp server's route): `id` is what a request's `lora` field names;
    `scale` is 0: no adapter applies unless a request asks for it."""

    id: int
    path: str
    name: str
    scale: float


class LoraAdapters(RootModel[list[LoraAdapterCard]]):
    """GET /lora-adapters: every adapter a request can name, in a stable order (the order they were added)."""


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in {
        400: "a bad request: the message names the field",
        401: "no valid API key",
        404: "no such model or adapter",
        413: "the request body is over the server's limit (max_body_bytes)",
        429: "the queue, or every adapter slot, is full: retry after Retry-After",
        500: "an internal error",
        503: "the server is shutting down",
    }.items()
}


# one server-sent event of a stream: its data is a JSON chunk (the answer's shape, one choice), an error, or [DONE]
EVENT = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
    "required": ["data"],
}


def responses(model: type[BaseModel], *, stream: bool = False) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route answering `model` (and with `stream`, server-sent events), and the errors."""
    ok: dict[str, Any] = {"model": model, "description": "the answer"}
    if stream:
        ok["content"] = {"text/event-stream": {"schema": EVENT}}
    return {200: ok, **ERRORS}
