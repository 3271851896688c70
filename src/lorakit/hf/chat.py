"""Chat rows rendered with the tokenizer's chat template and their loss masked: the template half of encoding.

    chat row:    {"messages": [{"role": "system" | "user" | "assistant", "content": "...", "train": false?}, ...]}
    alpaca row:  {"instruction": "...", "input": "..." (optional), "output": "..."}

A chat row is rendered with the tokenizer's own chat template (`tokenizer.apply_chat_template`), or one given
as a Jinja file (`read_template`) for a tokenizer without one. The loss falls only on the assistant turns: the
content of each assistant turn plus the end-of-turn token(s) the template writes right after it (the model must
learn to emit them to stop), never the role header; `"train": false` on an assistant turn keeps it as context
without loss. The spans are found from the template itself, with or without `{% generation %}` markers: render
the conversation up to the turn (with the generation prompt, which ends at the header), then through the turn;
the characters in between, trailing whitespace dropped, are the turn's, and a token of the whole rendering is
the turn's when its characters (the fast tokenizer's offsets) overlap them, as transformers' own mask decides.
A template that renders earlier turns differently once later ones follow, or does not render an assistant
turn's content as given, makes that row a bad row, never a wrong mask.

The rows are parsed into turns earlier (`examples.parse_messages`; Alpaca rows become prompt/completion rows
there, `examples.alpaca_prompt`), and the template file is read, saved and loaded by `templates`: both are
re-exported here (`chat.parse_messages`, `chat.read_template`, ...), where callers have always found them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .examples import ROLES as ROLES  # chat.ROLES, chat.Turn, ...: the parsing of chat rows is the examples stage's
from .examples import Turn as Turn
from .examples import alpaca_prompt as alpaca_prompt
from .examples import parse_messages as parse_messages
from .rows import DataError
from .templates import TEMPLATE_FILE as TEMPLATE_FILE  # chat.read_template, ...: the template file's own stage
from .templates import adapters_template as adapters_template
from .templates import load_template as load_template
from .templates import read_template as read_template
from .templates import save_template as save_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


class NoChatTemplateError(DataError):
    """Chat rows for a tokenizer without a chat template; `detail` says where (`lines`: which rows of a file),
    the message the remedy."""

    param = "chat_template"

    def __init__(self, where: str, lines: Sequence[int] = ()) -> None:
        self.lines = list(lines)
        if self.lines:
            shown = ", ".join(map(str, self.lines[:5])) + (" ..." if len(self.lines) > 5 else "")
            self.detail = (
                f"{where}: rows with 'messages' (line {shown}) need a chat template, and the tokenizer has none"
            )
        else:
            self.detail = f"{where}: chat rows ('messages') need a chat template, and the model's tokenizer has none"
        super().__init__(f"{self.detail}; pass chat_template= with a Jinja template file (e.g. ChatML)")


# -- turns -> text -> tokens --------------------------------------------------------------------------


def render(
    tokenizer: PreTrainedTokenizerBase,
    turns: Sequence[Turn],
    *,
    add_generation_prompt: bool = False,
    template: str | None = None,
) -> str:
    """The conversation as the tokenizer's chat template writes it; ValueError if the template refuses it.

    With `add_generation_prompt` it ends with the header of the assistant's next turn: the prompt to generate from.
    `template` (e.g. the one an adapter trained with, `load_template`) replaces the tokenizer's for this call only.
    """
    import jinja2

    messages = [{"role": t.role, "content": t.content} for t in turns]
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template refused this conversation ({e})") from None
    assert isinstance(text, str), type(text)
    return text


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn], max_length: int, where: str
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation, labels -100 but on trainable assistant turns; truncated together.

    `where` (file:line) names the row in NoChatTemplateError; a conversation the template cannot render or mask
    is a ValueError (a bad row).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError(where)
    if not tokenizer.is_fast:
        raise DataError(f"{where}: chat rows need a fast tokenizer (tokenizer.json) to map the template onto tokens")
    full = render(tokenizer, turns)
    trained = [i for i, t in enumerate(turns) if t.role == "assistant" and t.train]
    spans = [assistant_span(tokenizer, turns, i, full) for i in trained]
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)  # the template writes BOS itself
    ids: list[int] = list(enc["input_ids"])
    # a token is the assistant's when its characters overlap a span (transformers' rule for {% generation %}):
    # 'Ġfour' after a prompt ending in a space starts before the span and is still the answer's first token, while
    # a lone 'Ġ' whose trimmed offsets are empty at the span's start is the prompt's
    labels = [
        tok if any(a < end and b > start for start, end in spans) else IGNORE_INDEX
        for tok, (a, b) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids[:max_length], labels[:max_length]


def assistant_span(tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn], i: int, full: str) -> tuple[int, int]:
    """Character span in `full` of assistant turn i: its content and the end-of-turn text after it, no header."""
    before = render(tokenizer, turns[:i], add_generation_prompt=True) if i else ""
    through = render(tokenizer, turns[: i + 1])
    if not full.startswith(through):
        raise ValueError(
            f"the chat template writes messages[{i}] differently once later messages follow; "
            "lorakit cannot tell which tokens are the assistant's"
        )
    start = len(before) if through.startswith(before) else len(render(tokenizer, turns[:i]))
    body = turns[i].content.strip()
    found = through.find(body, start)
    if found < 0:
        raise ValueError(f"the chat template does not write messages[{i}]'s content as given; cannot mask its tokens")
    if through[start:found].strip():  # text between the prompt and the content: a header the template wrote anyway
        start = found
    return start, len(through.rstrip())


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, template: str | None = None) -> list[int]:
    """The special token(s) the chat template writes right after an assistant turn's content (e.g. <|im_end|>).

    Generation of a chat turn stops there: a template's end-of-turn is not always the tokenizer's EOS.
    """
    turns = (Turn("user", "hi"), Turn("assistant", "ok"))
    try:
        full = render(tokenizer, turns, template=template)
        start = render(tokenizer, turns[:1], add_generation_prompt=True, template=template)
    except ValueError:
        return []
    end = full.find("ok", len(start) if full.startswith(start) else 0)
    if end < 0:
        return []
    after = tokenizer(full[end + 2 :].lstrip(" "), add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    return [int(after[0])] if after and int(after[0]) in special else []
