"""Prompt lookup: draft tokens by copying what followed the context's own suffix earlier.

A pure function (`find_ngram_draft`) behind a thin per-session class (`NgramProposer`),
as in vLLM's `ngram_proposer.py`. Runs inside the verifier every round, so it is
vectorised with numpy (no per-token Python loop) and the session keeps the context as a
growing numpy buffer instead of converting the whole list every round.

The drafts are chosen deterministically, so `Draft.draft_probs` is None (one-hot q).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from shared.ngram_table import SharedDrafts
from shared.proposer import Draft

if TYPE_CHECKING:
    from shared.config import NgramConfig
    from shared.ngram_table import SharedNgramTable
    from shared.sampling import SamplingParams

# Tokens compared at the old end of the buffer to check that a new context extends it.
_BOUNDARY_CHECK = 8


def find_ngram_draft(
    context_ids: np.ndarray,  # [num_tokens], int32 or int64
    min_n: int,
    max_n: int,
    k: int,
) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix
    (`find_ngram_match` without the match's length)."""
    return find_ngram_match(context_ids, min_n, max_n, k)[0]


def find_ngram_match(
    context_ids: np.ndarray,  # [num_tokens], int32 or int64
    min_n: int,
    max_n: int,
    k: int,
) -> tuple[list[int], int]:
    """(draft, n): up to k tokens that followed the most recent earlier occurrence of the
    longest suffix, and that suffix's length n (([], 0) without a match).

    For n from max_n down to min_n, look for an earlier occurrence of the last n tokens
    (any occurrence except the suffix itself; it may overlap the suffix) and return up to
    k tokens that followed the most recent one. Longer n wins over recency; no match of
    length >= min_n gives [].

    Example (min_n=1, max_n=3, k=3), context = [7, 1, 2, 3, 9, 1, 2, 3, 4, 2, 3]:
      - n=3: suffix [4, 2, 3] occurs nowhere else.
      - n=2: suffix [2, 3] occurs at positions 2..3 and 6..7; the most recent is 6..7,
        followed by [4, 2, 3] -> the draft is [4, 2, 3].
    If k were 5 the draft would be [4, 2, 3, 4, 2]: a continuation that runs into the end
    of the context repeats with the match's period (here 3), which is what a loop does next;
    greedy decoding of small models loops often, and this drafts whole loop turns.

    Implementation: one boolean mask per n, `ok[e]` = "the n tokens ending at position e
    equal the suffix"; mask n+1 is mask n shifted by one AND one more column compare, so
    the cost is max_n vectorised passes over the context and it stops at the first n with
    no match (a longer n cannot match where a shorter one does not).
    """
    assert context_ids.ndim == 1, context_ids.shape
    assert 0 < min_n <= max_n, (min_n, max_n)
    last = context_ids.shape[0] - 1
    if k <= 0 or last < min_n:
        return [], 0

    # ok[i] <-> candidate occurrence ending at e = i + j (e <= last - 1, so a token follows).
    ok = context_ids[:last] == context_ids[last]
    best_ok: np.ndarray | None = None
    best_n = 0
    for j in range(max_n):
        if j > 0:
            # Extend every surviving candidate one token to the left: c[e - j] == c[last - j].
            ok = ok[1:] & (context_ids[: last - j] == context_ids[last - j])
        if not ok.any():
            break
        best_ok, best_n = ok, j + 1
    if best_ok is None or best_n < min_n:
        return [], 0
    # Most recent occurrence = the last True; its end position is index + (best_n - 1).
    end = best_ok.shape[0] - 1 - int(best_ok[::-1].argmax()) + best_n - 1
    continuation = context_ids[end + 1 : end + 1 + k]
    if continuation.shape[0] < k:  # reached the end: period = last - end = len(continuation)
        continuation = np.resize(continuation, k)  # tiles it
    return continuation.tolist(), best_n


class NgramProposer:
    """Per-session prompt-lookup proposer (implements `shared.proposer.Proposer`).

    State is the session's context as a growing numpy buffer: each `propose` appends only
    the tokens added since the last call (the verifier's context extends the previous one
    by the accepted tokens); a context that does not extend it is reloaded.
    """

    def __init__(self, prompt_ids: Sequence[int], min_n: int, max_n: int,
                 table: SharedNgramTable | None = None, greedy: bool = True) -> None:  # fmt: skip
        assert 0 < min_n <= max_n, (min_n, max_n)
        self.min_n = min_n
        self.max_n = max_n
        self._buf = np.empty(max(64, 2 * len(prompt_ids)), dtype=np.int64)
        self._len = 0
        self._sync(prompt_ids)
        reads = table is not None and (greedy or table.config.sampled)
        # (the verifier teaches the table every request's output, whatever its method)
        self.shared = SharedDrafts(table, greedy) if reads else None

    def propose(self, context_ids: Sequence[int], k: int) -> Draft:
        context = self._sync(context_ids)
        draft, n = find_ngram_match(context, self.min_n, self.max_n, k)
        if self.shared is not None:  # the table where the own match is weak (or missing)
            draft = self.shared.draft(context_ids, k, own_n=n if draft else 0) or draft
        return Draft(token_ids=draft)

    def update(self, num_accepted: int) -> None:
        if self.shared is not None:  # the contamination guard's measure
            self.shared.update(num_accepted)

    def set_params(self, params: dict[str, float]) -> None:
        pass  # prompt lookup has no per-session knobs

    def close(self) -> None:
        pass

    def _sync(self, context_ids: Sequence[int]) -> np.ndarray:  # [num_tokens], int64 view
        """Bring the buffer in line with `context_ids`; return a view of it."""
        if isinstance(context_ids, np.ndarray):
            self._len = 0  # the caller already has an array: nothing to cache
            return context_ids
        num_tokens = len(context_ids)
        if not self._extends(context_ids, num_tokens):
            self._len = 0  # rewritten or rolled back past the boundary: reload
        if num_tokens > self._buf.shape[0]:
            grown = np.empty(max(num_tokens, 2 * self._buf.shape[0]), dtype=np.int64)
            grown[: self._len] = self._buf[: self._len]
            self._buf = grown
        if num_tokens > self._len:
            self._buf[self._len : num_tokens] = context_ids[self._len : num_tokens]
        self._len = num_tokens
        return self._buf[:num_tokens]

    def _extends(self, context_ids: Sequence[int], num_tokens: int) -> bool:
        """Whether the cached tokens are a prefix of `context_ids` (or it is a prefix of them).

        NOTE: checks the first token and the last few tokens at the shorter of the two ends,
        not every token: the verifier only appends or rolls back. A rewrite elsewhere would
        only cost acceptance (the verifier is lossless), never correctness.
        """
        shared_len = min(self._len, num_tokens)
        if shared_len == 0:
            return True
        lo = max(0, shared_len - _BOUNDARY_CHECK)
        return (
            context_ids[0] == self._buf[0]
            and list(context_ids[lo:shared_len]) == self._buf[lo:shared_len].tolist()
        )


class NgramProposerFactory:
    """Makes `NgramProposer` sessions; with a `SharedNgramTable` they also draft from it
    (the verifier teaches it every finished request's output)."""

    method = "ngram"

    def __init__(self, config: NgramConfig, table: SharedNgramTable | None = None) -> None:
        self.config = config
        self.table = table
        # Warm up numpy's code paths so the first round pays no first-call cost.
        find_ngram_draft(np.arange(16, dtype=np.int64) % 4, config.min_n, config.max_n, 4)

    def for_tenant(self, tenant: str) -> NgramProposerFactory:
        """Sessions that read one tenant's table (`SharedNgramTable.for_tenant`)."""
        if self.table is None or not tenant:
            return self
        view = copy.copy(self)
        view.table = self.table.for_tenant(tenant)
        return view

    def new_session(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> NgramProposer:
        # NOTE: sampling does not matter: drafts are deterministic, so q is one-hot for any p.
        return NgramProposer(prompt_ids, self.config.min_n, self.config.max_n, self.table, sampling.greedy)
