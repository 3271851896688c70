"""The chat template as a file: read one a run is given (`read_template`), save the one a run trained with
beside its adapter (`save_template`, as `chat_template.jinja`), read it back (`load_template`), and choose the
one to score or run several adapters with (`adapters_template`); the first stage of `data.prepare`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .rows import DataError

TEMPLATE_FILE = "chat_template.jinja"  # beside the adapter; the name transformers itself saves templates under


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
