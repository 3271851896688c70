"""A conversation with a chat model, kept across turns: which chat template renders it, and the prompt of the
next reply, the oldest turns dropped when the whole no longer fits the model's context.

Each turn the whole conversation is rendered again with the template (as a chat server does), so what the model
reads is exactly what it would read from a fresh request holding the same messages. The template is the one the
adapter trained with (saved beside it by finetune, `templates.load_template`), else the tokenizer's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import chat
from .examples import Turn
from .rows import DataError
from .templates import TEMPLATE_FILE, adapters_template

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase


class NoTemplateError(DataError):
    """A chat with a model whose tokenizer has no chat template and an adapter that saved none."""

    param = "chat_template"

    def __init__(self, model: str | Path, adapters: Sequence[str | Path] = ()) -> None:
        saved = f"no adapter saved one ({TEMPLATE_FILE}) and " if adapters else ""
        self.detail = f"{model}: chatting needs a chat template; {saved}the model's tokenizer has none"
        super().__init__(f"{self.detail}; pass chat_template= with a Jinja template file (e.g. ChatML)")


def choose_template(
    tok: PreTrainedTokenizerBase,
    model: str | Path,
    adapter_dirs: Mapping[str, str | Path] | None = None,
    given: str | Path | None = None,
) -> str:
    """The chat template to talk with: the file `given`, else the one the adapters trained with, else the
    tokenizer's own; NoTemplateError when there is none (DataError when the adapters' templates differ).

    Examples:
        >>> from transformers import PreTrainedTokenizerFast
        >>> from tokenizers import Tokenizer, models
        >>> tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))
        >>> tok.chat_template = "{{ messages[0]['content'] }}"
        >>> choose_template(tok, "m")
        "{{ messages[0]['content'] }}"
    """
    adapter_dirs = adapter_dirs or {}
    template = adapters_template(adapter_dirs, given) or getattr(tok, "chat_template", None)
    if not isinstance(template, str) or not template:  # a tokenizer may hold several named ones: not chosen here
        raise NoTemplateError(model, list(adapter_dirs.values()))
    return template


def context_length(model: nn.Module, tok: PreTrainedTokenizerBase) -> int | None:
    """The most tokens the model reads at once: its config's max_position_embeddings, else the tokenizer's
    model_max_length where that is a real limit, else None (no limit known)."""
    from ..generation.kv import context_length as positions

    n = positions(model)
    if n is None:
        m = getattr(tok, "model_max_length", None)
        n = m if isinstance(m, int) and m < 10**9 else None  # transformers' "no limit" is a huge sentinel
    return n


@dataclass(frozen=True)
class Prompt:
    """The next reply's prompt: the rendered text, its token ids, and how many old turns were dropped to fit."""

    text: str
    ids: list[int]
    dropped: int


@dataclass
class Conversation:
    """The messages so far, after an optional system message; `prompt` renders them for the next reply."""

    template: str
    system: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def add(self, role: str, content: str) -> None:
        """Append a user or assistant message."""
        self.turns.append(Turn(role, content))

    def reset(self) -> None:
        """Forget every message but the system message."""
        self.turns.clear()

    def render(self, tok: PreTrainedTokenizerBase, turns: Sequence[Turn] | None = None) -> Prompt:
        """The conversation (or the system message and `turns`) rendered with the template, ending in the
        assistant's header."""
        system = [Turn("system", self.system)] if self.system else []
        messages = system + list(self.turns if turns is None else turns)
        text = chat.render(tok, messages, add_generation_prompt=True, template=self.template)
        ids = [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]  # the template writes BOS itself
        return Prompt(text, ids, 0)

    def prompt(self, tok: PreTrainedTokenizerBase, room: int | None) -> Prompt:
        """The prompt of the next reply in at most `room` tokens (None: no limit): the oldest turns are dropped
        from the conversation, a user message with the replies after it at a time, until it fits.

        ValueError, the conversation unchanged, when even the latest user message alone does not fit.
        """
        turns, dropped = list(self.turns), 0
        while True:
            prompt = self.render(tok, turns)
            if room is None or len(prompt.ids) <= room:
                self.turns[:] = turns
                return Prompt(prompt.text, prompt.ids, dropped)
            starts = [i for i, t in enumerate(turns) if t.role == "user"]
            if len(starts) < 2:
                raise ValueError(
                    f"the last message makes a prompt of {len(prompt.ids)} tokens, and the model's context "
                    f"leaves {room} tokens for the prompt beside the reply's max_new_tokens"
                )
            dropped += starts[1]  # the oldest user message and every reply up to the next one
            del turns[: starts[1]]
