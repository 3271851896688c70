"""safetensors files through the `safetensors` library, with its errors turned into LoraFileError naming the file.

The library caps the header, checks every dtype, shape and offset, and refuses truncated files, gaps and
overlaps before it reads a tensor. `read` reads each tensor from the file straight into its own memory
(`pread`, not a mapping), so reading needs one copy of the file, not two, and no tensor aliases a file
that another program might rewrite in place. `write` goes through `atomic.atomic_write`: a reader never
sees a torn file, and files get the permissions open() gives.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from ..errors import LoraFileError
from .atomic import atomic_write

# what the library and torch raise on a malformed file (torch, e.g., for a packed dtype whose shape lies)
_MALFORMED = (SafetensorError, RuntimeError, ValueError, TypeError, KeyError, OverflowError)
# plain words for the library's terser reasons
_HINTS = {
    "file not fully covered": "the data does not end where the header says: truncated, or extra bytes?",
    "invalid header length": "the header runs past the end of the file: truncated?",
}


def read(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; any flaw raises LoraFileError naming the file.

    Examples:
        >>> import tempfile, torch
        >>> path = Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> write(path, {"w": torch.ones(2, 3)}, {"format": "pt"})
        >>> tensors, meta = read(path)
        >>> tuple(tensors["w"].shape), meta
        ((2, 3), {'format': 'pt'})
    """
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt", backend="pread") as f:  # header checked in full first
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except OSError as e:  # the library's I/O errors do not name the file
        raise LoraFileError(f"{path}: cannot be read ({e})") from None
    except _MALFORMED as e:
        reason = str(e)[:300]
        hint = next((f" ({h})" for words, h in _HINTS.items() if words in reason), "")
        raise LoraFileError(f"{path}: not a valid safetensors file: {reason}{hint}") from None
    return tensors, metadata


def write(path: str | Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (any device, layout or sharing) and string metadata to a safetensors file, atomically.

    Examples:
        >>> import tempfile, torch
        >>> w = torch.arange(6.0).reshape(2, 3)
        >>> path = Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> write(path, {"w": w, "w_t": w.t()})  # a transposed view is stored as its own tensor
        >>> read(path)[0]["w_t"].tolist()
        [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    """
    # bytes, not the library's save_file: that writes its own 0600 temporary file and renames it
    atomic_write(path, save(_owning_storage(tensors), metadata))


def _owning_storage(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, each owning its whole storage: the library refuses entries that share storage."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.nbytes() and (storage.data_ptr() in seen or storage.nbytes() != t.nbytes):
            t = t.clone()  # a view of a bigger tensor, or tied to another entry (tied embeddings)
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out
