"""`POST /v1/completions` and `POST /v1/chat/completions`: prompts become engine requests, steps become responses.

A request with several prompts, or `n` > 1, is several engine requests (choice `index` = prompt * n + sample,
as OpenAI numbers them), each its own row in the engine's batch; sample j of a seeded request uses seed + j.
Chats are rendered with the tokenizer's chat template (`lorakit.hf.chat.render`, as `lorakit finetune` and
`lorakit predict` render them) and stop at the template's end-of-turn token as well as at EOS.
A request runs the adapter its `"model"` names, or a weighted composition of adapters (`adapters` or `lora`,
compose_http.py), batched with every other request. Its adapters are held in the registry from before its first
engine request until its last one ends, so that an unload or an eviction waits for them (`registry.Registry`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..generation.sampling import SamplingParams
from ..hf import chat
from . import compose_http, schemas
from .access_log import AccessRecord, record_of
from .compose import NotComposable, RowKey, names_of
from .engine import Engine, EngineClosed, EngineFailed, QueueFull
from .handle import Handle, Step
from .limits import Limits
from .metrics import Metrics, label
from .protocol import DONE, APIError, ChatRequest, CompletionRequest, error_body, event
from .registry import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class TextService:
    """A causal LM served through the engine: what the two text endpoints need."""

    tokenizer: PreTrainedTokenizerBase
    engine: Engine
    registry: Registry
    metrics: Metrics
    resolve: Callable[[str], str | None]  # a request's "model" -> adapter name (None: the base); APIError 404
    context: int  # the model's context length in tokens: prompt + max_tokens must fit
    vocab_size: int
    end_of_turn: tuple[int, ...] = field(default=())
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        eos = self.tokenizer.eos_token_id
        self.eos: tuple[int, ...] = () if eos is None else (int(eos),)
        self.end_of_turn = tuple(i for i in chat.end_of_turn_ids(self.tokenizer) if i not in self.eos)
        self._templates: dict[Path, str | None] = {}  # adapter directory -> the chat template saved beside it

    def routes(self) -> APIRouter:
        """The router with both endpoints."""
        router = APIRouter()
        router.include_router(compose_http.router(self.registry))

        # Prompts are capped before they are tokenized, and tokenized (chats rendered) in a worker thread, so
        # that no request's size stalls the event loop that answers every other client.

        @router.post("/v1/completions", responses=schemas.responses(schemas.Completion, stream=True))
        async def completions(body: CompletionRequest, request: Request) -> Any:
            """OpenAI's completions: text in, text out."""
            self.limits.check_completion(body)
            prompts = await asyncio.to_thread(self.completion_prompts, body)
            key = compose_http.requested(body, self.resolve, self.registry)
            return await self.complete(body, key, prompts, self.eos, "completions", body.echo, record_of(request))

        @router.post("/v1/chat/completions", responses=schemas.responses(schemas.ChatCompletion, stream=True))
        async def chat_completions(body: ChatRequest, request: Request) -> Any:
            """OpenAI's chat completions: a conversation in, the assistant's next message out."""
            self.limits.check_chat(body)
            key = compose_http.requested(body, self.resolve, self.registry)
            prompt, stops = await asyncio.to_thread(self.chat_prompt_and_stops, body, key)
            return await self.complete(body, key, [prompt], stops, "chat", False, record_of(request))

        return router

    # -- prompts ---------------------------------------------------------------------------------------

    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        """The token ids of each prompt: text is encoded as `lorakit generate` encodes it (with BOS)."""
        given: Any = body.prompt
        single = isinstance(given, str) or (given and isinstance(given[0], int))  # one text, or one list of ids
        prompts: list[str | list[int]] = [given] if single else given
        if not given:
            raise APIError(400, "prompt is an empty list; expected a string, strings, or token ids", param="prompt")
        out = []
        for p in prompts:
            ids = [int(i) for i in self.tokenizer(p)["input_ids"]] if isinstance(p, str) else list(p)
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise APIError(
                    400,
                    f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                    param="prompt",
                )
            if not ids:
                raise APIError(400, "prompt is empty: nothing to continue from", param="prompt")
            self.limits.check_prompt_tokens(len(ids), "prompt")
            out.append(ids)
        return out

    def chat_prompt_and_stops(self, body: ChatRequest, key: RowKey) -> tuple[list[int], tuple[int, ...]]:
        """The rendered conversation's ids, and the token ids that end the reply (EOS, the template's end of turn):
        with the chat template of the request's one adapter, if it runs one and it has its own."""
        template = self.template(key if isinstance(key, str) else None)
        stops = self.eos + tuple(i for i in chat.end_of_turn_ids(self.tokenizer, template) if i not in self.eos)
        return self.chat_prompt(body, template), stops

    def template(self, adapter: str | None) -> str | None:
        """The chat template an adapter trained with (`finetune --chat-template`, saved beside it), else None:
        the tokenizer's own. Read once per adapter directory."""
        if adapter is None:
            return None
        path = self.registry.path(adapter)
        if path not in self._templates:
            self._templates[path] = chat.load_template(path)
        return self._templates[path]

    def chat_prompt(self, body: ChatRequest, template: str | None = None) -> list[int]:
        """The conversation rendered with the chat template (`template`, or the tokenizer's), ending in the
        assistant's header."""
        if template is None and not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "the model's tokenizer has no chat template; use /v1/completions", param="messages")
        try:
            raw = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
            turns = chat.parse_messages(raw, training=False)
            text = chat.render(self.tokenizer, turns, add_generation_prompt=True, template=template)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes BOS itself
        self.limits.check_prompt_tokens(len(ids), "messages")
        return [int(i) for i in ids]

    def params(
        self, body: CompletionRequest | ChatRequest, prompt: list[int], stop_ids: tuple[int, ...]
    ) -> list[SamplingParams]:
        """One SamplingParams per sample of `prompt`; APIError 400 if prompt + max_tokens exceeds the context."""
        room = self.context - len(prompt)
        max_tokens = body.max_tokens if body.max_tokens is not None else room  # chat's default: the rest
        if len(prompt) + max_tokens > self.context:
            raise APIError(
                400,
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) is {len(prompt) + max_tokens} "
                f"tokens, over the model's context of {self.context} tokens; shorten the prompt or lower max_tokens",
                param="max_tokens",
            )
        if max_tokens < 1:
            raise APIError(
                400,
                f"the prompt ({len(prompt)} tokens) fills the model's context ({self.context})",
                param="messages" if isinstance(body, ChatRequest) else "prompt",
            )
        return [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                seed=None if body.seed is None else body.seed + j,
                stop=body.stops(),
                stop_token_ids=stop_ids,
            )
            for j in range(body.n)
        ]

    # -- requests ----------------------------------------------------------------------------------------

    async def complete(
        self,
        body: CompletionRequest | ChatRequest,
        adapter: RowKey,
        prompts: list[list[int]],
        stop_ids: tuple[int, ...],
        endpoint: str,
        echo: bool,
        record: AccessRecord | None = None,
    ) -> Any:
        """Submit every choice of `adapter` (a `compose.RowKey`: None, a name, a composition), then answer with one
        JSON response or a stream of server-sent events."""
        if body.logprobs not in (None, False):
            raise APIError(400, "logprobs are not supported by lorakit serve", param="logprobs")
        record = record or AccessRecord()
        record.adapter, record.prompt_tokens = label(adapter), sum(len(p) for p in prompts)
        params = [self.params(body, p, stop_ids) for p in prompts]  # all checked before anything is submitted
        if adapter is not None:
            try:
                await self.registry.hold(*names_of(adapter))  # waits while --max-loaded adapters are all in use
            except EngineClosed as e:  # the engine failed or drains while this request waited for a slot
                raise unavailable(e) from None
        try:
            handles = self.submit(prompts, adapter, params)
        except NotComposable as e:
            self.release(adapter)
            raise APIError(400, str(e), param=compose_http.where_is(body, e.name, self.registry.names())) from None
        except BaseException:
            self.release(adapter)
            raise
        reply = Reply(self, body, endpoint, prompts, echo, adapter, handles, record)
        if body.stream:
            return StreamingResponse(reply.stream(), media_type="text/event-stream")
        return await reply.whole()

    def submit(self, prompts: list[list[int]], adapter: RowKey, params: list[list[SamplingParams]]) -> list[Handle]:
        """Every choice's engine request, or none: a full queue cancels those already in and answers 429 (a DoRA
        adapter composed: `NotComposable`, raised before any is in)."""
        handles: list[Handle] = []
        try:
            for prompt, ps in zip(prompts, params, strict=True):
                handles += [self.engine.submit(prompt, adapter, p) for p in ps]
        except QueueFull as e:
            for h in handles:
                h.cancel()
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(
                429, f"the server is busy ({e}); retry shortly", code="queue_full", headers={"Retry-After": "1"}
            ) from None
        except EngineClosed as e:
            for h in handles:
                h.cancel()
            raise unavailable(e) from None
        return handles

    def release(self, adapter: RowKey) -> None:
        """Let go of the request's adapters, in a worker thread (a deferred unload runs on the engine thread)."""
        for name in names_of(adapter):
            asyncio.get_running_loop().run_in_executor(None, self.registry.release, name)


@dataclass
class Reply:
    """One request's choices read from the engine, as an OpenAI response or a stream of chunks."""

    service: TextService
    body: CompletionRequest | ChatRequest
    endpoint: str
    prompts: list[list[int]]
    echo: bool
    adapter: RowKey
    handles: list[Handle]
    record: AccessRecord = field(default_factory=AccessRecord)
    started: float = field(default_factory=time.perf_counter)
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        self.chat = self.endpoint == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + self.rid
        self.created = int(time.time())
        self.last: dict[int, float] = {}
        self.finals: dict[int, Step] = {}

    async def steps(self) -> AsyncIterator[tuple[int, Step]]:
        """(choice index, step) from every handle as they come; the adapter is released when all have ended."""
        queue: asyncio.Queue[tuple[int, Step] | None] = asyncio.Queue()

        async def pump(i: int, handle: Handle) -> None:
            async for step in handle:
                await queue.put((i, step))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(self.handles)]
        try:
            while len(self.finals) < len(self.handles):
                item = await queue.get()
                assert item is not None
                i, step = item
                self.observe(i, step)
                yield i, step
        finally:
            for t in tasks:
                t.cancel()
            for h in self.handles:
                h.cancel()  # a no-op for a finished request; frees the slot of one whose client went away
            self.service.release(self.adapter)

    def observe(self, i: int, step: Step) -> None:
        """Timing and counts of one step, into the metrics."""
        m, now = self.service.metrics, time.perf_counter()
        if step.token_id is not None:
            self.record.first_token()
            hist = m.ttft if i not in self.last else m.per_token
            hist.labels(label(self.adapter)).observe(now - self.last.get(i, self.started))
            self.last[i] = now
        if step.finish_reason is not None:
            self.finals[i] = step
            self.record.completion_tokens = sum(s.completion_tokens for s in self.finals.values())

    def usage(self) -> dict[str, int]:
        """OpenAI's usage counts: each prompt counted once, every choice's completion tokens."""
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(s.completion_tokens for s in self.finals.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def head(self, i: int) -> str:
        """The echoed prompt of choice i ("" without echo)."""
        return str(self.service.tokenizer.decode(self.prompts[i // self.body.n])) if self.echo else ""

    def frame(self, choices: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
        """The envelope of a response or a chunk."""
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if self.chat and more else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.body.model, "choices": choices}

    async def whole(self) -> JSONResponse:
        """Wait for every choice; the whole response (500 if the engine failed one, 503 if the server did)."""
        texts = [self.head(i) for i in range(len(self.handles))]
        async for i, step in self.steps():
            texts[i] += step.text
        failed = [s for s in self.finals.values() if s.finish_reason == "error"]
        if failed:
            status, headers = (503, {"Retry-After": "5"}) if failed[0].unavailable else (500, None)
            raise APIError(status, f"generation failed: {failed[0].error or 'engine error'}", headers=headers)
        choices = []
        for i, text in enumerate(texts):
            reason = self.finals[i].finish_reason
            if self.chat:
                message = {"role": "assistant", "content": text}
                choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
        return JSONResponse(self.frame(choices) | {"usage": self.usage()})

    async def stream(self) -> AsyncIterator[str]:
        """Server-sent events: a chunk per step with text (and the finish), then usage if asked, then [DONE]."""
        try:
            if self.chat:
                for i in range(len(self.handles)):
                    delta = {"role": "assistant", "content": ""}
                    yield event(self.frame([{"index": i, "delta": delta, "finish_reason": None}], chunk=True))
            elif self.echo:
                for i in range(len(self.handles)):
                    yield event(self.frame([{"index": i, "text": self.head(i), "finish_reason": None}], chunk=True))
            async for i, step in self.steps():
                if step.finish_reason == "error":
                    status = 503 if step.unavailable else 500
                    yield event(error_body(status, f"generation failed: {step.error or 'engine error'}"))
                    continue
                if not step.text and step.finish_reason is None:
                    continue
                if self.chat:
                    delta = {"content": step.text} if step.text else {}
                    choice: dict[str, Any] = {"index": i, "delta": delta, "finish_reason": step.finish_reason}
                else:
                    choice = {"index": i, "text": step.text, "logprobs": None, "finish_reason": step.finish_reason}
                yield event(self.frame([choice], chunk=True))
            if self.body.include_usage():
                yield event(self.frame([], chunk=True) | {"usage": self.usage()})
            yield DONE
        except APIError as e:
            yield event(e.body())
            yield DONE


def unavailable(e: EngineClosed) -> APIError:
    """The 503 of a request the engine can no longer take: it failed (its reason), or the server is shutting down."""
    message = str(e) if isinstance(e, EngineFailed) else "the server is shutting down"
    return APIError(503, message, headers={"Retry-After": "5"})
