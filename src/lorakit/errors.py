"""lorakit's exceptions: each names the file, key, shape or value and what was expected."""


class LoraError(Exception):
    """Base of lorakit's own errors."""


class LoraFileError(LoraError, ValueError):
    """An adapter file or directory is missing, malformed, or does not fit the model."""


class LoraStateError(LoraError, RuntimeError):
    """An operation does not fit the layer's state (merging twice, unmerging an unmerged layer, ...)."""


class LoraMergeError(LoraError, ValueError):
    """A merge would produce non-finite weights."""
