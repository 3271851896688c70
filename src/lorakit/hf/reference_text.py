"""The forgetting monitor's text (`finetune --reference FILE`): a plain UTF-8 file read and cut into chunks of
`max_length` tokens, for `train.forgetting.ReferenceKL`; every problem names the file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader

from ..train.forgetting import reference_loader

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def reference_text_loader(path: Path, tok: PreTrainedTokenizerBase, chunk: int, batch_size: int) -> DataLoader[Any]:
    """The reference text file's tokens in chunks of `chunk`, for ReferenceKL; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the reference text file does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: the reference text is not UTF-8 ({e.reason} at byte {e.start})") from None
    ids = tok(text, add_special_tokens=False)["input_ids"] if text.strip() else []
    if not ids:
        raise ValueError(f"{path}: the reference text is empty")
    return reference_loader(ids, chunk, batch_size, tok.pad_token_id or 0)
