"""Validated examples -> token ids and labels, the chat template rendering chat rows and masking their loss:
the encode stage of `data.prepare` (and of `ondisk`, row by row).

    causal-lm: labels are the ids, -100 on prompt tokens (and all but trainable assistant turns in chat rows)
    seq-cls:   labels are the label's id (`examples.label_to_id`)
    dpo, grpo: prompt and completion ids as TRL tokenises them (`preference_encoding`)

A row that keeps nothing to learn from (too short, its prompt filling max_length) is a BadRow saying why.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..ui.progress import Progress, quiet
from . import chat
from .examples import AnyExample, Example
from .preference_encoding import encode_pair, encode_prompt
from .preference_rows import PairExample, PromptExample
from .prepared import IGNORE_INDEX, Encoded
from .rows import BadRow, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def encode(
    examples: Sequence[AnyExample],
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    max_length: int,
    label2id: Mapping[str | int, int] | None = None,
    progress: Progress | None = None,
    description: str = "tokenizing",
) -> tuple[list[Encoded], list[BadRow]]:
    """Token ids per example; causal-lm labels are -100 on prompt tokens (and all but assistant turns in chat
    rows), so the loss falls on completions; chat.NoChatTemplateError if a chat row meets no template."""
    out: list[Encoded] = []
    bad: list[BadRow] = []
    with (progress or quiet()).task(description, total=len(examples), unit="rows") as step:
        for ex in examples:
            step.advance()
            enc = encode_one(ex, tokenizer, task, max_length, label2id)
            if isinstance(enc, BadRow):
                bad.append(enc)
            else:
                out.append(enc)
    return out, bad


def encode_splits(
    train: Sequence[AnyExample],
    valid: Sequence[AnyExample],
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    max_length: int,
    label2id: Mapping[str | int, int] | None,
    progress: Progress | None = None,
) -> tuple[list[Encoded], list[Encoded], list[BadRow]]:
    """The training and validation examples encoded (`encode`), and the rows of either with nothing to learn."""
    train_enc, bad = encode(train, tokenizer, task, max_length, label2id, progress, "tokenizing training rows")
    valid_enc, more = encode(valid, tokenizer, task, max_length, label2id, progress, "tokenizing validation rows")
    return train_enc, valid_enc, bad + more


def encode_one(
    ex: AnyExample,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    max_length: int,
    label2id: Mapping[str | int, int] | None = None,
) -> Encoded | BadRow:
    """One example's token ids and labels (see `encode`), or the BadRow saying why it has nothing to learn."""
    if isinstance(ex, PairExample):
        return encode_pair(ex, tokenizer, max_length)
    if isinstance(ex, PromptExample):
        return encode_prompt(ex, tokenizer, max_length)
    if task == "seq-cls":
        if label2id is None or ex.label is None:
            raise ValueError(f"{ex.where}: seq-cls needs the example's label and label2id (label_to_id)")
        return {"input_ids": tokenizer(ex.text, truncation=True, max_length=max_length)["input_ids"],
                "labels": label2id[ex.label]}  # fmt: skip
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if ex.messages is not None:
        try:
            ids, labels = chat.encode_chat(tokenizer, ex.messages, sys.maxsize, ex.where)  # cut below
        except DataError:
            raise  # no template, no fast tokenizer: a problem of the setup, not of this row
        except ValueError as e:
            return BadRow(ex.path, ex.line, str(e), ex.unit)
    elif ex.completion is None:
        ids = tokenizer(ex.text)["input_ids"] + eos
        labels = list(ids)
    else:
        prompt = tokenizer(ex.text)["input_ids"] if ex.text else []
        completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + eos
        ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    cut = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if len(ids) < 2 or all(x == IGNORE_INDEX for x in labels[1:]):
        return BadRow(ex.path, ex.line, f"{_why_empty(ex, ids, cut)}; nothing to learn from this row", ex.unit)
    return {"input_ids": ids, "labels": labels}


def _why_empty(ex: Example, ids: Sequence[int], cut: bool) -> str:
    """Why a row kept no token to learn from (`cut`: max_length cut it short)."""
    if len(ids) < 2:
        return "fewer than 2 tokens"
    if not cut:  # whole, yet no label after the first token (which nothing predicts)
        return "no token after the row's first is labelled (the first token is never predicted)"
    if ex.messages is not None:
        return "the conversation before the first trained assistant turn fills max_length"
    return "the prompt fills max_length"
