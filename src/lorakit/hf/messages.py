"""A row's list of chat messages -> turns, each message checked: the part of parsing rows that chat rows
(`examples`), preference pairs and prompts (`preference_rows`) share.

    [{"role": "system" | "user" | "assistant", "content": "...", "train": false?}, ...]

Every problem is a ValueError naming the field and the message (`messages[2] has role 'tool'`), which the
parse stage makes the row's `BadRow` reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn:
    """One message of a conversation; `train` is False for an assistant turn kept out of the loss."""

    role: str
    content: str
    train: bool = True


def parse_messages(value: Any, *, training: bool = True, name: str = "messages") -> tuple[Turn, ...]:
    """The turns of a row's `messages` field (or the field `name`); ValueError naming the message and what is
    wrong with it.

    A training row needs an assistant turn to learn from; a prompt (`training=False`) does not.

    Examples:
        >>> parse_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])[1]
        Turn(role='assistant', content='hello', train=True)
    """
    if not isinstance(value, list):
        raise ValueError(f"field {name!r} is a {type(value).__name__}; expected a list of {{role, content}} objects")
    if not value:
        raise ValueError(f"field {name!r} is empty; expected a list of {{role, content}} objects")
    turns = tuple(_turn(i, m, name) for i, m in enumerate(value))
    if not training:
        return turns
    if not any(t.role == "assistant" for t in turns):
        raise ValueError("no assistant message; the loss falls on assistant turns only, so there is nothing to learn")
    if not any(t.role == "assistant" and t.train for t in turns):
        raise ValueError("every assistant message has train: false; nothing to learn from this row")
    return turns


def _turn(i: int, message: Any, name: str) -> Turn:
    """name[i] as a Turn; ValueError saying what is wrong with it."""
    at = f"{name}[{i}]"
    if not isinstance(message, dict):
        raise ValueError(f"{at} is a {type(message).__name__}; expected an object with role and content")
    for key in ("role", "content"):
        if key not in message:
            raise ValueError(f"{at} has no {key!r}; it has {', '.join(map(repr, message)) or 'no fields'}")
    role, content, train = message["role"], message["content"], message.get("train")
    if role not in ROLES:
        raise ValueError(f"{at} has role {role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"{at} content is a {type(content).__name__}; expected a string")
    if train is not None and not isinstance(train, bool):  # None: the key absent (Parquet fills missing keys so)
        raise ValueError(f"{at} has train {train!r}; expected true or false")
    if train is not None and role != "assistant":
        raise ValueError(f"{at} is a {role} message with 'train'; only assistant turns carry the loss")
    if role == "assistant" and train is not False and not content.strip():
        raise ValueError(f"{at} is an empty assistant message; nothing to learn from it")
    return Turn(role, content, train is not False)


def as_dicts(turns: tuple[Turn, ...]) -> list[dict[str, str]]:
    """The turns as the {role, content} messages a chat template reads."""
    return [{"role": t.role, "content": t.content} for t in turns]
