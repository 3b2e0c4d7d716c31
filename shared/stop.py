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
        # Every proper prefix of a stop string: a tail in this set must be held back.
        self._prefixes = {s[:i] for s in self.stop for i in range(1, len(s))}
        self._max_hold = max((len(s) - 1 for s in self.stop), default=0)
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
        # NOTE: the match that *ends* first wins (then the one starting first): generating
        # one character at a time would stop there, so the output does not depend on how
        # the text was split into feeds (how many tokens a speculative round emitted).
        best_end, cut = -1, -1
        for s in self.stop:
            i = buf.find(s)
            if i == -1:
                continue
            end = i + len(s)
            if best_end == -1 or end < best_end or (end == best_end and i < cut):
                best_end, cut, self.matched = end, i, s
        if cut != -1:
            self._pending = ""
            self.stopped = True
            return buf[:cut], True
        hold = 0
        for h in range(min(self._max_hold, len(buf)), 0, -1):
            if buf[-h:] in self._prefixes:
                hold = h
                break
        self._pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The held-back tail, at the end of a generation that no stop string ended."""
        text, self._pending = self._pending, ""
        return text
