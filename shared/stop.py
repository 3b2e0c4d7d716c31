"""Stop strings with OpenAI semantics: the stop string and everything after it are dropped.

Text arrives in pieces (one per decoded round), so a stop string can span several pieces.
`StopChecker` holds back the longest tail that could still start a stop string; nothing
that may turn out to be part of a stop string is ever emitted.
"""

from __future__ import annotations


class StopChecker:
    """Incremental stop-string matcher for one generation.

        checker = StopChecker(["\\n\\n", "```"])
        for piece in pieces:
            text, stopped = checker.feed(piece)
            emit(text)
            if stopped:
                break
        else:
            emit(checker.flush())  # generation ended without a stop: release the held tail
    """

    def __init__(self, stop: list[str]) -> None:
        # NOTE: an empty stop string would match before any text; it is ignored.
        self.stop = sorted({s for s in stop if s}, key=len)
        # One KMP matcher per stop string: memory and set-up linear in its length (a set of
        # every prefix, as before, was quadratic: 200k characters took ~20 GB).
        self._failure = [_failure_function(s) for s in self.stop]
        self._state = [0] * len(self.stop)  # per stop string: chars of it the text ends with
        self._pending = ""  # held-back tail: a proper prefix of some stop string
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the generation

    def feed(self, text: str) -> tuple[str, bool]:
        """Newly decoded text -> (text safe to emit now, whether a stop string matched)."""
        if not self.stop:
            return text, False
        if self.stopped:
            return "", True
        buf = self._pending + text
        offset = len(self._pending)
        state = self._state
        # NOTE: the match that *ends* first wins (then the one starting first, i.e. the
        # longest): generating one character at a time would stop there, so the output does
        # not depend on how the text was split into feeds (how many tokens a round emitted).
        for pos, char in enumerate(text, start=offset):
            ended = None
            for i, s in enumerate(self.stop):
                q, fail = state[i], self._failure[i]
                while q and s[q] != char:
                    q = fail[q - 1]
                if s[q] == char:
                    q += 1
                state[i] = q
                if q == len(s):
                    ended = s  # stop strings are sorted by length: the last is the longest
            if ended is not None:
                self._pending, self.stopped, self.matched = "", True, ended
                return buf[: pos + 1 - len(ended)], True
        hold = max(state)  # < len(s) for each s: no match ended
        self._pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The held-back tail, at the end of a generation that no stop string ended."""
        text, self._pending = self._pending, ""
        return text


def _failure_function(s: str) -> list[int]:
    """KMP: fail[i] = length of the longest proper prefix of s[: i + 1] that is also its suffix."""
    fail = [0] * len(s)
    q = 0
    for i in range(1, len(s)):
        while q and s[i] != s[q]:
            q = fail[q - 1]
        if s[i] == s[q]:
            q += 1
        fail[i] = q
    return fail
