"""Stop strings (`shared.stop.StopChecker`): OpenAI semantics over text arriving in pieces."""

from __future__ import annotations

import pytest

from shared.stop import StopChecker


def _run(stop: list[str], pieces: list[str]) -> tuple[list[str], bool, str]:
    """Feed pieces until a stop; returns (emitted per feed, stopped, flushed tail)."""
    checker = StopChecker(stop)
    emitted = []
    for piece in pieces:
        text, stopped = checker.feed(piece)
        emitted.append(text)
        if stopped:
            return emitted, True, ""
    return emitted, False, checker.flush()


########################### tables ###########################


@pytest.mark.parametrize(
    "stop,pieces,expected_emitted,expected_stopped,expected_flush",
    [
        # stop string inside one feed: text before it is emitted, the rest dropped
        (["END"], ["abc END def"], ["abc "], True, ""),
        # stop string spanning two feeds: "E" is held back, never emitted
        (["END"], ["abc E", "ND tail"], ["abc ", ""], True, ""),
        # stop string spanning three feeds
        (["<|stop|>"], ["x<|", "st", "op|>y"], ["x", "", ""], True, ""),
        # held-back prefix turns out not to be a stop: released by the next feed
        (["END"], ["abc E", "nd"], ["abc ", "End"], False, ""),
        # held-back prefix at the end of generation: released by flush
        (["END"], ["abc EN"], ["abc "], False, "EN"),
        # multiple stop strings: the one that starts first wins
        (["\n\n", "def"], ["x = 1\n\ndef f"], ["x = 1"], True, ""),
        (["\n\n", "def"], ["x = 1 def\n\n"], ["x = 1 "], True, ""),
        # overlapping stop strings: the one that ends first wins, as if fed char by char
        (["abcd", "bc"], ["xabcd"], ["xa"], True, ""),
        (["abcd", "bc"], ["xab", "cd"], ["x", "a"], True, ""),
        # ending at the same place: the one that starts first wins
        (["cd", "bcd"], ["xbcd"], ["x"], True, ""),
        # stop at the very start: nothing is emitted
        (["###"], ["### heading"], [""], True, ""),
        (["###"], ["#", "##"], ["", ""], True, ""),
        # hold back only the longest tail that is a stop-string prefix
        (["aab"], ["xaa", "a", "b"], ["x", "a", ""], True, ""),
        # no stop string in the text: everything passes through, nothing to flush
        (["STOP"], ["hello ", "world"], ["hello ", "world"], False, ""),
        # empty stop strings are ignored (they would match before any text)
        ([""], ["hello"], ["hello"], False, ""),
    ],
)
def test_stop_checker_table(stop, pieces, expected_emitted, expected_stopped, expected_flush):
    emitted, stopped, flushed = _run(stop, pieces)
    assert emitted == expected_emitted
    assert stopped == expected_stopped
    assert flushed == expected_flush


# Empty stop list: feed returns its input unchanged and never holds anything back.
def test_empty_stop_list_is_passthrough():
    checker = StopChecker([])
    for piece in ["a", "", "b\n", "\ufffd"]:
        assert checker.feed(piece) == (piece, False)
    assert checker.flush() == ""


# The stop string that matched is recorded; feeds after the stop emit nothing.
def test_after_stop_nothing_more():
    checker = StopChecker(["\n", "END"])
    assert checker.feed("one END two\n") == ("one ", True)
    assert checker.matched == "END"
    assert checker.stopped
    assert checker.feed("more") == ("", True)
    assert checker.flush() == ""


# Property: whatever the split into pieces, emitted + flushed text equals the text cut
# where a one-character-at-a-time scan first completes a stop string.
@pytest.mark.parametrize(
    "stop", [["ab"], ["aba", "bb"], ["a"], ["xyz"], ["aabab", "bab"], ["baab", "aa", "ba"]]
)
def test_any_split_equals_one_shot(stop):
    text = "bbaababbaabbab"
    # Reference: scan one character at a time, stop at the first position a stop string ends.
    ends = [e for e in range(1, len(text) + 1) if any(text[:e].endswith(s) for s in stop)]
    starts = [ends[0] - len(s) for s in stop if ends and text[: ends[0]].endswith(s)]
    cut = min(starts) if starts else len(text)
    for chunk in (1, 2, 3, 5):
        pieces = [text[i : i + chunk] for i in range(0, len(text), chunk)]
        emitted, stopped, flushed = _run(stop, pieces)
        assert "".join(emitted) + flushed == text[:cut], chunk
        assert stopped == bool(starts)


def test_long_stop_strings_cost_linear_memory():
    """A 200,000-character stop string once took a verifier to ~20 GB (a set of every prefix)."""
    import tracemalloc

    long_stop = "ab" * 100_000
    tracemalloc.start()
    checker = StopChecker([long_stop, "x" * 50_000])
    for _ in range(200):
        checker.feed("ab")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50 * 2**20, peak
    assert not checker.stopped
    assert checker.flush() == "ab" * 200  # all held back: a prefix of the long stop string


def test_kmp_matcher_agrees_with_a_char_by_char_search():
    """Random texts, stop strings and feed splits against the definition: stop at the first
    end of any stop string, cut at its start (the longest one ending there)."""
    import random

    rng = random.Random(0)
    for _ in range(500):
        stop = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        emitted, stopped, flushed = _run(stop, pieces)
        expected = text
        for end in range(1, len(text) + 1):
            hits = [s for s in stop if text[:end].endswith(s)]
            if hits:
                expected = text[: end - max(map(len, hits))]
                break
        assert "".join(emitted) + flushed == expected, (stop, pieces)
        assert stopped == (expected != text or any(s in text for s in stop))
