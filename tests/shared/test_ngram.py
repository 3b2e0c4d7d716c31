"""Prompt lookup (`shared.ngram`): match tables, the proposer's incremental buffer, speed."""

from __future__ import annotations


import numpy as np
import pytest

from shared.config import NgramConfig
from shared.ngram import NgramProposer, NgramProposerFactory, find_ngram_draft
from shared.proposer import Proposer
from shared.sampling import SamplingParams


def _reference_draft(context: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Brute force: longest n first, then the most recent earlier occurrence."""
    num_tokens = len(context)
    for n in range(max_n, min_n - 1, -1):
        suffix = context[num_tokens - n :]
        for end in range(num_tokens - 2, n - 2, -1):  # end < last: some token follows
            if n <= num_tokens - 1 and context[end - n + 1 : end + 1] == suffix:
                period = num_tokens - 1 - end  # the match repeats every `period` tokens
                return [context[end + 1 + i % period] for i in range(k)]
    return []


########################### find_ngram_draft: tables ###########################


@pytest.mark.parametrize(
    "context,min_n,max_n,k,expected",
    [
        # the docstring's worked example: [2, 3] matched, most recent occurrence wins
        ([7, 1, 2, 3, 9, 1, 2, 3, 4, 2, 3], 1, 3, 3, [4, 2, 3]),
        # no earlier occurrence of any suffix n-gram
        ([1, 2, 3, 4, 5], 1, 3, 4, []),
        # k truncates a long continuation
        ([1, 2, 3, 4, 5, 6, 1, 2], 2, 2, 2, [3, 4]),
        # a continuation that reaches the end of the context repeats with the match's period
        ([1, 2, 3, 1, 2], 1, 2, 5, [3, 1, 2, 3, 1]),
        # the longest n wins over a more recent shorter match: [8, 3] -> 5 beats [3] -> 6
        ([8, 3, 5, 3, 6, 8, 3], 1, 2, 1, [5]),
        # with max_n=1 the most recent [3] wins instead
        ([8, 3, 5, 3, 6, 8, 3], 1, 1, 1, [6]),
        # most recent occurrence of the same n wins
        ([1, 4, 9, 1, 4, 7, 1, 4], 2, 2, 1, [7]),
        # an occurrence may overlap the suffix itself: [5,5] ends at index 2, period 1
        ([5, 5, 5, 5], 2, 2, 3, [5, 5, 5]),
        # min_n bounds from below: only a 1-gram matches, min_n=2 rejects it
        ([1, 2, 9, 2], 2, 3, 2, []),
        ([1, 2, 9, 2], 1, 3, 2, [9, 2]),
        # max_n bounds from above: a 3-gram exists but only n<=2 is tried (most recent [2, 3])
        ([1, 2, 3, 7, 0, 2, 3, 8, 1, 2, 3], 1, 2, 1, [8]),
        ([1, 2, 3, 7, 0, 2, 3, 8, 1, 2, 3], 1, 3, 1, [7]),
        # k = 0 and too-short contexts give nothing
        ([1, 2, 1, 2], 1, 2, 0, []),
        ([3], 1, 2, 4, []),
        ([], 1, 2, 4, []),
        # context shorter than min_n + 1 cannot hold an earlier occurrence
        ([3, 3], 2, 2, 1, []),
    ],
)
def test_find_ngram_draft_table(context, min_n, max_n, k, expected):
    for dtype in (np.int32, np.int64):
        got = find_ngram_draft(np.asarray(context, dtype=dtype), min_n, max_n, k)
        assert got == expected, (dtype, got)
        assert all(type(t) is int for t in got)


# The vectorised search agrees with the brute-force reference on random small alphabets.
def test_find_ngram_draft_matches_reference():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        context = rng.integers(0, int(rng.integers(1, 5)), int(rng.integers(0, 25))).tolist()
        min_n = int(rng.integers(1, 4))
        max_n = min_n + int(rng.integers(0, 3))
        k = int(rng.integers(0, 6))
        got = find_ngram_draft(np.asarray(context, dtype=np.int64), min_n, max_n, k)
        assert got == _reference_draft(context, min_n, max_n, k), (context, min_n, max_n, k)


# Bad bounds are programming errors, caught by asserts.
@pytest.mark.parametrize("min_n,max_n", [(0, 2), (3, 2)])
def test_find_ngram_draft_bad_bounds(min_n, max_n):
    with pytest.raises(AssertionError):
        find_ngram_draft(np.arange(8), min_n, max_n, 2)


########################### NgramProposer ###########################


def _factory(min_n: int = 1, max_n: int = 3) -> NgramProposerFactory:
    return NgramProposerFactory(NgramConfig(min_n=min_n, max_n=max_n))


# The factory makes sessions that satisfy the Proposer protocol and draft deterministically.
def test_factory_session_is_a_proposer_with_one_hot_q():
    factory = _factory()
    assert factory.method == "ngram"
    proposer = factory.new_session([1, 2, 3, 1, 2], SamplingParams(temperature=0.8))
    assert isinstance(proposer, Proposer)
    draft = proposer.propose([1, 2, 3, 1, 2], 4)
    assert draft.token_ids == [3, 1, 2, 3]
    assert draft.draft_probs is None
    proposer.update(2)  # no-op
    proposer.close()  # no-op


# A context growing round by round drafts exactly what a from-scratch search drafts.
def test_proposer_incremental_equals_from_scratch():
    rng = np.random.default_rng(1)
    context = rng.integers(0, 6, 10).tolist()
    proposer = NgramProposer(context, 1, 3)
    for _ in range(300):  # grows past the initial buffer, forcing reallocation
        context = context + rng.integers(0, 6, int(rng.integers(1, 5))).tolist()
        expected = find_ngram_draft(np.asarray(context), 1, 3, 4)
        assert proposer.propose(context, 4).token_ids == expected


# Rollback, rewrite, a fresh context and numpy input are all reconciled, never stale.
@pytest.mark.parametrize(
    "second_context",
    [
        [1, 2, 3, 1, 2, 3, 1],  # rolled back (shorter prefix)
        [1, 2, 3, 1, 2, 9, 9, 1, 2],  # rewritten near the old end, then extended
        [7, 2, 3, 1, 2, 3, 1, 2, 3],  # first token differs
        [4, 4],  # unrelated short context
    ],
)
def test_proposer_reconciles_non_extending_context(second_context):
    proposer = NgramProposer([1, 2, 3, 1, 2, 3, 1, 2, 3], 1, 3)
    proposer.propose([1, 2, 3, 1, 2, 3, 1, 2, 3, 1], 3)
    expected = find_ngram_draft(np.asarray(second_context), 1, 3, 3)
    assert proposer.propose(second_context, 3).token_ids == expected
    assert proposer.propose(np.asarray(second_context), 3).token_ids == expected
    assert proposer.propose(second_context + [2], 3).token_ids == find_ngram_draft(
        np.asarray(second_context + [2]), 1, 3, 3
    )
