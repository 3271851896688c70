"""lorakit's exceptions: each names the file, key, shape or value and what was expected."""


class LoraError(Exception):
    """Base of lorakit's own errors.

    `param` names the parameter whose value is the remedy (`err.param == "allow_base_mismatch"`), or is None
    where no parameter is; a front end (the CLI) words that remedy in its own terms (its flags) from it. An
    error class whose remedy is always the same parameter sets it as a class attribute; `param=` sets it on one.
    """

    param: str | None = None

    def __init__(self, *args: object, param: str | None = None) -> None:
        super().__init__(*args)
        if param is not None:
            self.param = param


class LoraFileError(LoraError, ValueError):
    """An adapter file or directory is missing, malformed, or does not fit the model."""


class LoraStateError(LoraError, RuntimeError):
    """An operation does not fit the layer's state (merging twice, unmerging an unmerged layer, ...)."""


class LoraMergeError(LoraError, ValueError):
    """A merge would produce non-finite weights."""


class LoraAdapterNotFound(LoraError, KeyError):
    """No adapter of that name on the model or layer; the message lists the ones there are.

    A KeyError, as a lookup by name is, but its message reads as written (KeyError would quote it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class LoraFileChanged(LoraFileError):
    """An adapter file's tensors differ from the hashes recorded beside it when it was saved (lorakit.json)."""


class LoraBaseMismatch(LoraFileError):
    """An adapter was saved for another base: `differences` says which modules or config fields differ, and how;
    `detail` is the message without its remedy (the `allow_base_mismatch` parameter)."""

    param = "allow_base_mismatch"

    def __init__(self, detail: str, differences: list[str]) -> None:
        super().__init__(
            f"{detail}; load it onto the base it was trained on, or pass allow_base_mismatch=True to load it anyway"
        )
        self.detail, self.differences = detail, differences


class ProvenanceNote(UserWarning):
    """What a load could not check, or checked another way: no lorakit.json, a QLoRA adapter on its source base."""


class LayoutNote(ProvenanceNote):
    """An adapter file in an older layout, converted on load: which layout, which PEFT version wrote it (a
    ProvenanceNote, so the CLI prints it as a `note:` line as it prints the others)."""
