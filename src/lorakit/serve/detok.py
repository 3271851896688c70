"""The text of a completion as it grows, token by token, with stop strings held back until they are safe.

Decoding token by token is wrong for characters that take several tokens (a byte-level BPE splits "é"
or an emoji over two or three) and for tokenizers whose pieces depend on their neighbours (SentencePiece's
leading space). So every step decodes the whole completion, after a few prompt tokens for context, and
emits the new suffix; a trailing U+FFFD (an unfinished character) is held back until it completes. Stop
strings are matched as the text grows (`stops.StopScanner`), so each token costs its own characters, not the
whole text times every stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .stops import StopScanner

_CONTEXT = 4  # prompt tokens decoded before the completion, so the first token's leading space survives
_UNFINISHED = "\ufffd"  # what tokenizers decode an incomplete UTF-8 sequence to


class TextStream:
    """The new text of one completion after each token.

    Examples:
        >>> class Chars:  # a stand-in tokenizer: token i is chr(i)
        ...     def decode(self, ids, skip_special_tokens=True):
        ...         return "".join(map(chr, ids))
        >>> s = TextStream(Chars(), prompt=[], stop=("!!",))
        >>> [s.push(ord(c)) for c in "hi!x!!"]
        [('h', False), ('i', False), ('', False), ('!x', False), ('', False), ('', True)]
        >>> s.text
        'hi!x'
    """

    def __init__(self, tokenizer: Any, prompt: Sequence[int], stop: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        self._context = list(prompt[-_CONTEXT:])
        self._prefix = self._decode(self._context)
        self._stops = StopScanner(stop)
        self._ids: list[int] = []
        self.text = ""  # what has been emitted so far

    def _decode(self, ids: list[int]) -> str:
        text = self._tok.decode(ids, skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence of ids decodes to one string
        return text

    def _full(self) -> str:
        """The completion's text so far: decoded after the prompt's last tokens, that prefix cut off."""
        whole = self._decode(self._context + self._ids)
        if whole.startswith(self._prefix):
            return whole[len(self._prefix) :]
        return self._decode(self._ids)  # the context merged with the completion: decode it alone

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token: (the new text that is safe to emit, whether a stop string was completed).

        After a stop string the emitted text ends right before it, and the stream is finished.
        """
        self._ids.append(token_id)
        full = self._full()
        whole = full.rstrip(_UNFINISHED)  # an unfinished character is never part of a stop string yet
        hit = self._stops.feed(whole)
        if hit is not None:
            return self._emit(full[: max(hit, len(self.text))]), True
        safe = len(whole) - self._stops.held
        return self._emit(full[:safe]), False

    def rest(self) -> str:
        """The text held back so far (a possible start of a stop string), emitted when the completion ends."""
        return self._emit(self._full())

    def _emit(self, upto: str) -> str:
        """The part of `upto` not emitted yet; emitted text is never taken back."""
        new = upto[len(self.text) :]  # if the tokenizer re-read earlier text differently, only the tail is sent
        self.text += new
        return new
