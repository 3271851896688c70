"""Predictions for input rows, in their order: the library behind `lorakit predict`.

    requests, bad = read_requests("inputs.jsonl", "causal-lm", tokenizer)
    completions = complete(model, tokenizer, requests, max_new_tokens=20)       # greedy by default
    labels = classify(model, tokenizer, requests, id2label)                       # seq-cls

Input rows are JSON objects, one a line: `{"text": ...}` (the text to classify, or a prompt to complete),
`{"prompt": ...}`, or `{"messages": [{"role": ..., "content": ...}, ...]}` (causal-lm: rendered with the
tokenizer's chat template, ending in the assistant's turn). An optional `"id"` is carried to the output.
Every row is checked before any prediction; a bad one is a `BadRow` (`line N: reason`).

Causal-lm prompts are generated in batches, left-padded (the new tokens of every row start at the same
position), so a batch gives what one-at-a-time generation gives.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch
from torch import nn

from ..generation.decode import generate_ids
from ..generation.sampling import SamplingParams
from ..ui import progress as progress_mod
from . import chat, generation
from .models import TASKS
from .rows import BadRow, DataError, Row, parse_json_line, read_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..ui.progress import Progress

STDIN = "-"
FIELDS = ("text", "prompt", "messages")


@dataclass(frozen=True)
class Request:
    """One checked input row: where it is, its optional id, and the text to feed the model."""

    line: int
    text: str
    id: Any = None
    chat: bool = False  # rendered from messages: the template wrote the special tokens already


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> str:
    """A chat as the prompt for the assistant's next turn: rendered as training renders chats (chat.render)."""
    return chat.render(tokenizer, chat.parse_messages(messages, training=False), add_generation_prompt=True)


def source_name(source: str | Path | TextIO) -> str:
    """How rows from `source` are named in messages: the path, `<stdin>`, or the stream's name."""
    if isinstance(source, (str, Path)):
        return "<stdin>" if str(source) == STDIN else str(source)
    return "<stdin>" if source is sys.stdin else str(getattr(source, "name", "<stream>"))


def read_rows(source: str | Path | TextIO) -> tuple[list[tuple[int, Row]], list[BadRow]]:
    """(line, row) pairs and unparsable lines from a JSONL/CSV file, `-` (stdin) or an open text stream."""
    if isinstance(source, (str, Path)) and str(source) != STDIN:
        return read_records(source)
    stream = sys.stdin if isinstance(source, (str, Path)) else source
    name = source_name(source)
    records: list[tuple[int, Row]] = []
    bad: list[BadRow] = []
    for number, text in enumerate(stream, start=1):
        row = parse_json_line(name, number, text)
        if isinstance(row, BadRow):
            bad.append(row)
        elif row is not None:
            records.append((number, row))
    if not records and not bad:
        raise DataError(f"{name}: no input rows; expected one JSON object a line")
    return records, bad


def _request(line: int, row: Row, task: str) -> tuple[str | list[dict[str, Any]], Any]:
    """(text or messages, id) of a row; ValueError saying what is wrong with it."""
    given = [f for f in FIELDS if f in row]
    if len(given) != 1:
        have = ", ".join(map(repr, row)) or "no fields"
        raise ValueError(f"expected exactly one of 'text', 'prompt', 'messages'; the row has {have}")
    field = given[0]
    if task == "seq-cls" and field != "text":
        raise ValueError(f"a seq-cls row needs 'text' (the text to classify); the row has {field!r}")
    value = row[field]
    if field == "messages":
        return _messages(value), row.get("id")
    if not isinstance(value, str):
        raise ValueError(f"field {field!r} is a {type(value).__name__}; expected a string")
    if not value.strip():
        raise ValueError(f"field {field!r} is empty")
    return value, row.get("id")


def _messages(value: Any) -> list[dict[str, Any]]:
    """A chat's messages, checked: a non-empty list of {"role": str, "content": str}."""
    if not isinstance(value, list) or not value:
        raise ValueError('field \'messages\' must be a non-empty list of {"role": ..., "content": ...}')
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f'messages[{i}] is {json.dumps(m)[:60]}; expected {{"role": str, "content": str}}')
    return value


def read_requests(
    source: str | Path | TextIO, task: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[Request], list[BadRow]]:
    """Every row of `source` checked (and chats rendered) for `task`: the usable ones and the bad ones.

    Raises chat.NoChatTemplateError when rows hold messages and the tokenizer has no chat template.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is invalid: expected one of {', '.join(TASKS)}")
    records, bad = read_rows(source)
    where = source_name(source)
    checked: list[tuple[int, str | list[dict[str, Any]], Any]] = []
    for line, row in records:
        try:
            value, row_id = _request(line, row, task)
        except ValueError as e:
            bad.append(BadRow(where, line, str(e)))
            continue
        checked.append((line, value, row_id))
    chats = [line for line, value, _ in checked if isinstance(value, list)]
    if chats and not getattr(tokenizer, "chat_template", None):
        raise chat.NoChatTemplateError(where, chats)
    requests = []
    for line, value, row_id in checked:
        if isinstance(value, list):
            try:
                requests.append(Request(line, render_chat(tokenizer, value), row_id, chat=True))
            except ValueError as e:  # a bad message, or the template's own checks (roles out of order, ...)
                bad.append(BadRow(where, line, str(e)))
        else:
            requests.append(Request(line, value, row_id))
    bad.sort(key=lambda b: b.line)
    return requests, bad


def _token_ids(tokenizer: PreTrainedTokenizerBase, r: Request, max_length: int | None = None) -> list[int]:
    """The request's token ids (a rendered chat already holds its special tokens)."""
    kwargs: dict[str, Any] = {"add_special_tokens": not r.chat}
    if max_length is not None:
        kwargs.update(truncation=True, max_length=max_length)
    ids = tokenizer(r.text, **kwargs)["input_ids"]
    return list(ids)


def _pad(rows: Sequence[list[int]], pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (B, T), padded on the left or the right."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        where = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, where] = torch.tensor(r, dtype=torch.long)
        mask[i, where] = 1
    return ids, mask


def _chunks(items: Sequence[Request], size: int) -> Iterable[Sequence[Request]]:
    """Consecutive slices of `size` items."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _check_batch_size(batch_size: int) -> None:
    """ValueError unless an int >= 1."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected an int >= 1")


def classify(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[Request],
    id2label: Mapping[int, str],
    *,
    batch_size: int = 8,
    max_length: int = 256,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """{"label", "probabilities": {name: p}} per request, in order (softmax of the head's logits, in fp32)."""
    _check_batch_size(batch_size)
    progress = progress or progress_mod.quiet()
    names = [id2label[i] for i in range(len(id2label))]
    device = next(model.parameters()).device
    out: list[dict[str, Any]] = []
    model.eval()
    total = math.ceil(len(requests) / batch_size)
    with torch.no_grad(), progress.task("classifying", total=total, unit="batches") as t:
        for chunk in _chunks(requests, batch_size):
            ids, mask = _pad([_token_ids(tokenizer, r, max_length) for r in chunk], tokenizer.pad_token_id, left=False)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, C)
            probs = torch.softmax(logits.float(), dim=-1).cpu()  # (B, C)
            for p in probs:
                out.append(
                    {"label": names[int(p.argmax())], "probabilities": dict(zip(names, p.tolist(), strict=True))}
                )
            t.advance()
    return out


def complete(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[Request],
    *,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> list[str]:
    """The completion of each request, in order: greedy when temperature is 0, else sampled, request i with its own
    generator seeded `seed + i` (so row 0 gives what `lorakit generate --seed S` and the server's `"seed": S` give).

    Rows are left-padded in batches, so a batch gives what one-at-a-time generation gives.
    """
    _check_batch_size(batch_size)
    generation.check_causal(model)
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens}, temperature={temperature}, top_p={top_p}: "
            "expected max_new_tokens >= 1, temperature >= 0, top_p in (0, 1]"
        )
    progress = progress or progress_mod.quiet()
    stops = generation.stop_ids(model, tokenizer)
    if any(r.chat for r in requests):  # a chat turn ends at the template's end-of-turn token, maybe not EOS
        stops += tuple(i for i in chat.end_of_turn_ids(tokenizer) if i not in stops)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[str] = []
    model.eval()
    total = math.ceil(len(requests) / batch_size)
    with progress.task("generating", total=total, unit="batches") as t:
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            params = [
                SamplingParams(max_new_tokens, temperature, top_p, top_k, seed + start + i, stop_token_ids=stops)
                for i in range(len(chunk))
            ]
            new = generate_ids(model, [_token_ids(tokenizer, r) for r in chunk], params, pad_id=pad)
            out += [str(tokenizer.decode(row, skip_special_tokens=True)) for row in new]
            t.advance()
    return out
