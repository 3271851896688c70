"""Preference pairs and prompts -> token ids exactly as TRL 1.16 tokenises them: the encode stage of tasks "dpo"
and "grpo" (`encoding.encode_one` hands their examples here).

    dpo:   {"prompt_ids", "chosen_ids", "rejected_ids"}     (DPOTrainer._prepare_dataset, then its collator's cut)
    grpo:  {"prompt_ids", "prompt" (the rendered text), "answer"}         (GRPOTrainer._tokenize_prompts)

DPO, as TRL does it: a plain pair gets the tokenizer's EOS text appended to both completions (unless they end with
it); then the prompt, prompt+chosen and prompt+rejected are tokenised whole (`tokenizer(text)`, special tokens
included; a conversational pair through the chat template, the prompt with the generation prompt), and the
completion starts where the prompt's ids and either whole's stop agreeing (`common_prefix_length`: a token that
merges across the boundary belongs to the completion). TRL's default truncation (`keep_start`) keeps the first
max_length tokens of prompt+completion and drops a row whose prompt alone fills max_length; here the completions
are cut when the row is encoded, and such a row is a bad row saying so.

GRPO: the prompt tokenised as TRL does before generating (`tokenizer(text)`, or the chat template with the
generation prompt); TRL never cuts a prompt, so one longer than max_length is a bad row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .chat import NoChatTemplateError
from .messages import Turn, as_dicts
from .preference_rows import PairExample, PromptExample
from .prepared import Encoded
from .rows import BadRow

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def encode_pair(ex: PairExample, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded | BadRow:
    """A pair's prompt, chosen and rejected ids as TRL's DPOTrainer makes them (module docstring), cut to
    `max_length`; a BadRow when the prompt fills it or the template refuses the conversation."""
    try:
        if isinstance(ex.prompt, tuple):
            assert isinstance(ex.chosen, tuple) and isinstance(ex.rejected, tuple)  # examples: all three or none
            _need_template(tokenizer, ex.where)
            prompt = _chat_ids(tokenizer, ex.prompt, generation_prompt=True)
            with_chosen = _chat_ids(tokenizer, ex.prompt + ex.chosen)
            with_rejected = _chat_ids(tokenizer, ex.prompt + ex.rejected)
        else:
            assert isinstance(ex.chosen, str) and isinstance(ex.rejected, str)
            eos = tokenizer.eos_token
            chosen, rejected = (c if eos is None or c.endswith(eos) else c + eos for c in (ex.chosen, ex.rejected))
            prompt = _ids(tokenizer(ex.prompt))
            with_chosen, with_rejected = _ids(tokenizer(ex.prompt + chosen)), _ids(tokenizer(ex.prompt + rejected))
    except ValueError as e:
        return BadRow(ex.path, ex.line, str(e), ex.unit)
    n = min(common_prefix_length(prompt, with_chosen), common_prefix_length(prompt, with_rejected))
    if n >= max_length:
        return BadRow(ex.path, ex.line, f"the prompt has {n} tokens and fills max_length={max_length}; "
                      "no completion token would be left (TRL drops such rows)", ex.unit)  # fmt: skip
    room = max_length - n  # keep_start: prompt + completion cut to max_length, as TRL's collator cuts them
    chosen_ids, rejected_ids = with_chosen[n:][:room], with_rejected[n:][:room]
    if not chosen_ids or not rejected_ids:
        side = "chosen" if not chosen_ids else "rejected"
        return BadRow(ex.path, ex.line, f"{side!r} adds no token after the prompt; nothing to learn", ex.unit)
    return {"prompt_ids": prompt[:n], "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def encode_prompt(ex: PromptExample, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded | BadRow:
    """A prompt's ids as TRL's GRPOTrainer makes them before generating, its text and answer; a BadRow when it is
    longer than `max_length` or the template refuses it."""
    try:
        if isinstance(ex.prompt, tuple):
            _need_template(tokenizer, ex.where)
            text = _chat_text(tokenizer, ex.prompt)
            ids = _chat_ids(tokenizer, ex.prompt, generation_prompt=True)
        else:
            text, ids = ex.prompt, _ids(tokenizer(ex.prompt))
    except ValueError as e:
        return BadRow(ex.path, ex.line, str(e), ex.unit)
    if len(ids) > max_length:
        return BadRow(ex.path, ex.line, f"the prompt has {len(ids)} tokens, over max_length={max_length}", ex.unit)
    if not ids:
        return BadRow(ex.path, ex.line, "the prompt has no tokens", ex.unit)
    return {"prompt_ids": ids, "prompt": text, "answer": ex.answer}


def common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    """How many leading ids the two sequences share (TRL's `common_prefix_length`).

    Examples:
        >>> common_prefix_length([1, 2, 3], [1, 2, 4, 5])
        2
    """
    n = 0
    for a, b in zip(ids, other, strict=False):
        if a != b:
            break
        n += 1
    return n


def _need_template(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """NoChatTemplateError (a problem of the setup, not of the row) for a tokenizer without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError(where)


def _chat_ids(
    tokenizer: PreTrainedTokenizerBase, turns: tuple[Turn, ...], *, generation_prompt: bool = False
) -> list[int]:
    """The turns' ids as TRL's `_tokenize` gets them: apply_chat_template(tokenize=True, return_dict=True)."""
    import jinja2

    try:
        out = tokenizer.apply_chat_template(
            as_dicts(turns), tools=None, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template refused this conversation ({e})") from None
    return _ids(out)


def _chat_text(tokenizer: PreTrainedTokenizerBase, turns: tuple[Turn, ...]) -> str:
    """The prompt turns rendered with the generation prompt: the text the rewards see as the prompt."""
    import jinja2

    try:
        text = tokenizer.apply_chat_template(as_dicts(turns), tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template refused this conversation ({e})") from None
    assert isinstance(text, str), type(text)
    return text


def _ids(encoding: Any) -> list[int]:
    """input_ids of one tokenizer or apply_chat_template result, as a list of ints."""
    return [int(i) for i in encoding["input_ids"]]
