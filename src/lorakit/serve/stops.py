"""Stop strings found in a growing text, in time linear in the text.

Each stop string has a Knuth–Morris–Pratt matcher: its state is the longest end of the text read so far that
begins the stop string, which is both what a stream must hold back (it may yet become the stop string) and,
once it reaches the whole string, a hit. Each new character moves every matcher that has begun (and those whose
first character it is) in amortised constant time, and a matcher's failure table is built only as far as it has
matched, so a request with many long stop strings costs its own text, not its text times its stop strings'
lengths on every token (the engine thread serves every request: one request's stop strings must not slow the
others).
"""

from __future__ import annotations

from collections.abc import Sequence


class _Matcher:
    """One stop string's KMP state over the text read so far."""

    __slots__ = ("stop", "state", "_fail")

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.state = 0  # characters of `stop` that the text read so far ends with
        self._fail = [0]  # KMP failure table: _fail[i] = longest proper border of stop[: i + 1], built as needed

    def _border(self, i: int) -> int:
        """_fail[i], extending the table by the entries before it first (each entry once, amortised O(1))."""
        s, fail = self.stop, self._fail
        while len(fail) <= i:
            j, k = len(fail), fail[-1]
            while k and s[j] != s[k]:
                k = fail[k - 1]
            fail.append(k + 1 if s[j] == s[k] else 0)
        return fail[i]

    def read(self, c: str) -> bool:
        """Read one character; True when the text now ends with the whole stop string."""
        s, m = self.stop, self.state
        while m and s[m] != c:
            m = self._border(m - 1)
        if s[m] == c:
            m += 1
        if m == len(s):
            self.state = self._border(m - 1)
            return True
        self.state = m
        return False


class StopScanner:
    """The stop strings of one request over its growing text.

    Examples:
        >>> scan = StopScanner(["abc", "cd"])
        >>> scan.feed("xxab"), scan.held
        (None, 2)
        >>> scan.feed("xxabcd")  # "abc" starts at 2
        2
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._matchers = [_Matcher(s) for s in stops]
        self._by_first: dict[str, list[_Matcher]] = {}
        for m in self._matchers:
            self._by_first.setdefault(m.stop[0], []).append(m)
        self._started: set[_Matcher] = set()  # matchers with state > 0
        self._read = ""  # the text read so far

    @property
    def held(self) -> int:
        """The longest end of the text read so far that begins a stop string (it must wait)."""
        return max((m.state for m in self._started), default=0)

    def feed(self, text: str) -> int | None:
        """Read `text` (the whole text so far, of which the part already read is unchanged as a rule): the start of
        the first stop string it now holds, or None. An earlier part that changed is read again from the start."""
        start = len(self._read)
        if not text.startswith(self._read):
            start = 0
            for m in self._started:
                m.state = 0
            self._started.clear()
        self._read = text
        hits: list[int] = []
        for i in range(start, len(text)):
            c = text[i]
            for m in [*self._started, *(m for m in self._by_first.get(c, ()) if m not in self._started)]:
                if m.read(c):
                    hits.append(i + 1 - len(m.stop))
                if m.state:
                    self._started.add(m)
                else:
                    self._started.discard(m)
        return min(hits) if hits else None
