"""The wire format: OpenAI-compatible request bodies (pydantic, checked strictly) and OpenAI-style error bodies.

A request field of the wrong type (`"max_tokens": "5"`) is a 400 naming the field, as OpenAI's API answers it.
A field that would change what a request means but that this server does not implement (`tools`,
`response_format`, non-zero penalties, `best_of`, `suffix`, vLLM's `min_p` ...) is a 400 naming it too, unless
its value asks for nothing (`"tools": []`, `"presence_penalty": 0`); other fields this server does not know (the
`openai` client's `user`, metadata) are ignored. Every error, whatever raised it, reaches the client as

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

ERROR_TYPES = {
    400: "invalid_request_error",
    413: "invalid_request_error",
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
    shown = "" if param is None or isinstance(got, (dict, list)) else f" (got {_short(got)})"
    where = f"field {param!r}" if param else "the request body"
    more = f"; and {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where}: {msg}{shown}{more}", param


def _short(value: Any) -> str:
    """repr of a value, cut to 60 characters without building the whole repr of a huge string."""
    text = repr(value[:61] if isinstance(value, (str, bytes)) else value)
    return text if len(text) <= 60 else text[:57] + "..."


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


INT64 = 2**63  # OpenAI's and vLLM's seeds are 64-bit signed integers (torch's generator takes up to 2**64 - 1)

# Fields that change what a request means, which this server does not implement -> the values that ask for
# nothing (accepted, and ignored). Any other value is a 400 naming the field: never a silently different answer.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "min_p": (None, 0),  # vLLM's sampling extensions
    "repetition_penalty": (None, 1),
}


def refuse_unless_neutral(value: Any, info: ValidationInfo) -> Any:
    """A field validator: the value if it asks for nothing (NEUTRAL), else ValueError naming the field."""
    name = info.field_name or ""
    if any(value == v and type(value) is not bool for v in NEUTRAL[name]):
        return value
    raise ValueError(
        f"{name} is not supported by lorakit serve (a value other than {NEUTRAL[name][1]!r} would change the answer)"
    )


class TextFormat(_Request):
    """`response_format` that asks for plain text: the only one served (no JSON mode, no schema)."""

    type: Literal["text"]


MAX_COMPOSED = 64  # adapters in one request's composition (each must be loaded while it runs: --max-loaded)


class AdapterWeight(_Request):
    """One item of lorakit's `adapters` extension field: an adapter and its weight in the request's composition."""

    name: str
    weight: float = 1.0


class LoraScale(_Request):
    """One item of llama.cpp server's per-request `lora` field: an adapter by `id` (its index in GET
    /lora-adapters) or by `name`, and its scale."""

    id: int | None = None
    name: str | None = None
    scale: float


class _Sampling(_Request):
    """The sampling fields shared by completions and chat completions (`adapters`/`lora`: a composition, compose.py)."""

    model: str
    adapters: list[AdapterWeight] | None = Field(default=None, max_length=MAX_COMPOSED)
    lora: list[LoraScale] | None = Field(default=None, max_length=MAX_COMPOSED)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # vLLM's extension: 0 or -1 samples from every token
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=64)
    best_of: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[Any, WithJsonSchema({"enum": [False, 0, None]})] = None  # others: 400 (text.py)
    # the fields below accept only the values that ask for nothing, and the schema says so (NEUTRAL)
    tools: list[Any] | None = Field(default=None, max_length=0)
    tool_choice: Literal["none"] | None = None
    functions: list[Any] | None = Field(default=None, max_length=0)
    function_call: Literal["none"] | None = None
    response_format: TextFormat | None = None
    presence_penalty: float | None = Field(default=None, ge=0, le=0)
    frequency_penalty: float | None = Field(default=None, ge=0, le=0)
    logit_bias: dict[str, Any] | None = Field(default=None, max_length=0)
    min_p: float | None = Field(default=None, ge=0, le=0)
    repetition_penalty: float | None = Field(default=None, ge=1, le=1)

    _refused = field_validator(
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "response_format",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "min_p",
        "repetition_penalty",
        mode="before",
    )(refuse_unless_neutral)

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        """best_of = n returns every sample, as n alone does; more would need ranking by log-probability."""
        if value is None or value == info.data.get("n", 1):
            return value
        raise ValueError("best_of other than n is not supported by lorakit serve (it ranks samples by log-probability)")

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


PromptTypes = str | list[str] | list[int] | list[list[int]]
_PROMPT_LISTS: dict[type, TypeAdapter[Any]] = {
    str: TypeAdapter(list[str]),
    int: TypeAdapter(list[int]),
    list: TypeAdapter(list[list[int]]),
}


def _prompt(value: Any) -> Any:
    """A prompt checked by the type of its first item, in one pass: pydantic's union of list types would try each
    and collect an error per item, seconds for a body of a million token ids."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        adapter = _PROMPT_LISTS.get(type(value[0]) if value else str)
        if adapter is not None:
            try:
                return adapter.validate_python(value, strict=True)
            except ValidationError as e:
                first = e.errors()[0]
                where = "".join(f"[{p}]" for p in first["loc"])
                raise ValueError(f"prompt{where}: {first['msg']}") from None
    raise ValueError("expected a string, a list of strings, a list of token ids, or a list of lists of token ids")


Prompt = Annotated[Any, PlainValidator(_prompt), WithJsonSchema(TypeAdapter(PromptTypes).json_schema())]
MAX_MESSAGES = 4096  # counted before each message is validated (a body of tiny messages is otherwise slow to check)


def _few_messages(value: Any) -> Any:
    """messages, if there are at most MAX_MESSAGES (checked before each is validated)."""
    if isinstance(value, list) and len(value) > MAX_MESSAGES:
        raise ValueError(f"{len(value)} messages, over this server's limit of {MAX_MESSAGES}")
    return value


class CompletionRequest(_Sampling):
    """`POST /v1/completions`: one prompt or several, as text or token ids."""

    prompt: Prompt
    echo: bool = False
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    suffix: str | None = Field(default=None, max_length=0)

    _suffix = field_validator("suffix", mode="before")(refuse_unless_neutral)


class ChatMessage(_Request):
    """One message; content as a string or as OpenAI's list of text parts."""

    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "user", "assistant"]  # lorakit.hf.chat.ROLES
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

    messages: Annotated[list[ChatMessage], BeforeValidator(_few_messages)] = Field(min_length=1)


class EmbeddingRequest(_Request):
    """`POST /v1/embeddings`: one text or several."""

    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 (the openai client's)
    dimensions: int | None = Field(default=None, ge=1)  # only the model's own size: no truncation is implied

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


MAX_NAME = 255  # an adapter's name: one path component's worth
MAX_PATH = 4096  # PATH_MAX on Linux


class LoadAdapterRequest(_Request):
    """`POST /v1/load_lora_adapter` (vLLM's name and fields)."""

    lora_name: str = Field(min_length=1, max_length=MAX_NAME)
    lora_path: str = Field(min_length=1, max_length=MAX_PATH)

    @field_validator("lora_path")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        """A NUL cannot be in a file name: refused here rather than by the file system."""
        if "\x00" in value:
            raise ValueError("a path cannot contain a NUL character")
        return value


class UnloadAdapterRequest(_Request):
    """`POST /v1/unload_lora_adapter` (vLLM's name and fields)."""

    lora_name: str = Field(min_length=1, max_length=MAX_NAME)
