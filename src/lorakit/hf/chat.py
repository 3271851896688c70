"""Chat and instruction rows: validate them, render them with the tokenizer's chat template, mask the loss.

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

Alpaca rows become prompt/completion rows with the standard Alpaca prompt (Taori et al., 2023), whatever the
tokenizer: `alpaca_prompt` is that prompt, so that prediction can render the same one.

The template a run trained with is saved beside the adapter (`save_template`, as `chat_template.jinja`) and read
back by `load_template`, so that a prediction renders conversations as training did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .rows import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = "chat_template.jinja"  # beside the adapter; the name transformers itself saves templates under
IGNORE_INDEX = -100

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


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


@dataclass(frozen=True)
class Turn:
    """One message of a conversation; `train` is False for an assistant turn kept out of the loss."""

    role: str
    content: str
    train: bool = True


# -- rows -> turns ------------------------------------------------------------------------------------


def parse_messages(value: Any, *, training: bool = True) -> tuple[Turn, ...]:
    """The turns of a row's `messages` field; ValueError naming the message and what is wrong with it.

    A training row needs an assistant turn to learn from; a prompt (`training=False`) does not.

    Examples:
        >>> parse_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])[1]
        Turn(role='assistant', content='hello', train=True)
    """
    if not isinstance(value, list):
        raise ValueError(f"field 'messages' is a {type(value).__name__}; expected a list of {{role, content}} objects")
    if not value:
        raise ValueError("field 'messages' is empty; expected a list of {role, content} objects")
    turns = tuple(_turn(i, m) for i, m in enumerate(value))
    if not training:
        return turns
    if not any(t.role == "assistant" for t in turns):
        raise ValueError("no assistant message; the loss falls on assistant turns only, so there is nothing to learn")
    if not any(t.role == "assistant" and t.train for t in turns):
        raise ValueError("every assistant message has train: false; nothing to learn from this row")
    return turns


def _turn(i: int, message: Any) -> Turn:
    """messages[i] as a Turn; ValueError saying what is wrong with it."""
    if not isinstance(message, dict):
        raise ValueError(f"messages[{i}] is a {type(message).__name__}; expected an object with role and content")
    for key in ("role", "content"):
        if key not in message:
            raise ValueError(f"messages[{i}] has no {key!r}; it has {', '.join(map(repr, message)) or 'no fields'}")
    role, content, train = message["role"], message["content"], message.get("train")
    if role not in ROLES:
        raise ValueError(f"messages[{i}] has role {role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"messages[{i}] content is a {type(content).__name__}; expected a string")
    if train is not None and not isinstance(train, bool):  # None: the key absent (Parquet fills missing keys so)
        raise ValueError(f"messages[{i}] has train {train!r}; expected true or false")
    if train is not None and role != "assistant":
        raise ValueError(f"messages[{i}] is a {role} message with 'train'; only assistant turns carry the loss")
    if role == "assistant" and train is not False and not content.strip():
        raise ValueError(f"messages[{i}] is an empty assistant message; nothing to learn from it")
    return Turn(role, content, train is not False)


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 (the Alpaca field's name)
    """The standard Alpaca prompt for an instruction (and its optional input); the completion follows it.

    Examples:
        >>> alpaca_prompt("Name a colour.").splitlines()[-4:]
        ['### Instruction:', 'Name a colour.', '', '### Response:']
    """
    if input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


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


# -- the template file --------------------------------------------------------------------------------


def read_template(path: str | Path) -> str:
    """A Jinja chat template from a file, its syntax checked; DataError naming the file (and line) if unusable."""
    import jinja2

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such chat template file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: the chat template is not UTF-8 text") from None
    if not text.strip():
        raise DataError(f"{path}: the chat template file is empty")
    try:
        _compile(text)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"{path}:{e.lineno}: not a valid Jinja template ({e.message})") from None
    return text


def _compile(template: str) -> None:
    """Compile a template in transformers' own Jinja environment (its {% generation %} tag included)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a private helper: without it, a syntax error shows when the first row is rendered
        return
    _compile_jinja_template(template)


def save_template(adapter_dir: str | Path, template: str) -> Path:
    """Write the chat template a run trained with beside its adapter; returns the file."""
    from ..files.atomic import atomic_write

    path = Path(adapter_dir) / TEMPLATE_FILE
    atomic_write(path, template.encode("utf-8"))
    return path


def load_template(adapter_dir: str | Path) -> str | None:
    """The chat template saved beside an adapter by `save_template`, or None if it trained without one.

    Examples:
        >>> load_template("no/such/adapter") is None
        True
    """
    path = Path(adapter_dir) / TEMPLATE_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def adapters_template(adapter_dirs: Mapping[str, str | Path], given: str | Path | None = None) -> str | None:
    """The chat template to score or run `adapter_dirs` with: the file `given`, else the one they trained with
    (`load_template`), else None (the tokenizer's own). DataError where the adapters trained with different ones:
    one rendering of the data cannot be each one's.

    Examples:
        >>> adapters_template({"a": "no/such/adapter"}) is None
        True
    """
    if given is not None:
        return read_template(given)
    saved = {name: t for name, d in adapter_dirs.items() if (t := load_template(d)) is not None}
    if len(set(saved.values())) > 1:
        raise DataError(
            f"the adapters trained with different chat templates ({', '.join(saved)}: each its own "
            f"{TEMPLATE_FILE}); evaluate them one at a time, or give one template for all"
        )
    return next(iter(saved.values()), None)
