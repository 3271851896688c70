"""Helpers of the chat tests: a ChatML template with generation markers, a conversation, rows files, label runs.

Import after `sys.path.insert(0, <this directory>)`.
"""

from __future__ import annotations

import json
from pathlib import Path

IGNORE = -100


CHATML_GEN = (  # CHATML with transformers' {% generation %} markers around what the assistant must emit
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "you are a helpful bot"},
    {"role": "user", "content": "what is two plus two ?"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "what colour is the sky ?"},
    {"role": "assistant", "content": "the sky is blue", "train": False},
    {"role": "user", "content": "good morning"},
    {"role": "assistant", "content": "hello world"},
]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of positions whose label is the token itself (everything else must be -100)."""
    runs: list[list[int]] = []
    for i, (t, y) in enumerate(zip(ids, labels, strict=True)):
        assert y in (t, IGNORE), f"position {i}: label {y} is neither the token {t} nor -100"
        if y == t:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
    return [[ids[i] for i in run] for run in runs]
