"""Incremental detokenization (`shared.detokenize`) with the project's byte-level BPE.

The tokenizer splits multi-byte characters across tokens ("é" = 2 tokens, "😀" = 3,
"中文" = 6), so single tokens decode to U+FFFD: the detokenizer must hold them back.
"""

from __future__ import annotations

import random

import pytest

from shared.detokenize import IncrementalDetokenizer
from shared.paths import models_dir

TOKENIZER_DIR = models_dir() / "codelm-target-m"


@pytest.fixture(scope="module")
def tokenizer():
    if not (TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip(f"no tokenizer at {TOKENIZER_DIR}")
    from shared.loading import load_tokenizer

    return load_tokenizer(TOKENIZER_DIR)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _stream(tokenizer, prompt_ids: list[int], gen_ids: list[int], round_size: int) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detok.add(gen_ids[i : i + round_size]) for i in range(0, len(gen_ids), round_size)]
    assert detok.text == "".join(pieces)
    return pieces


########################### the tokenizer really splits characters ###########################


# Guard for the tests below: these characters are split across several tokens here.
@pytest.mark.parametrize("text,min_tokens", [("é", 2), ("😀", 3), ("中文", 4)])
def test_multibyte_characters_span_tokens(tokenizer, text, min_tokens):
    ids = _encode(tokenizer, text)
    assert len(ids) >= min_tokens
    assert tokenizer.decode(ids) == text
    assert "\ufffd" in tokenizer.decode(ids[:1])


########################### streaming equals one-shot decode ###########################

GENERATIONS = [
    " return x + 1\n",
    "é",
    "😀",
    "中文",
    " héllo wörld 😀 中文 ok",
    "😀😀é中",  # split characters back to back, no ASCII between them
    "\n    # naïve café — done ✓\n",
]


# Concatenated add() outputs equal decode(generated ids), with no U+FFFD anywhere,
# for one token per round and for multi-token rounds.
@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("round_size", [1, 2, 3, 7])
@pytest.mark.parametrize("prompt", ["def f(x):", "", "s = 'ü"])
def test_stream_equals_decode(tokenizer, generation, round_size, prompt):
    prompt_ids, gen_ids = _encode(tokenizer, prompt), _encode(tokenizer, generation)
    pieces = _stream(tokenizer, prompt_ids, gen_ids, round_size)
    assert "".join(pieces) == tokenizer.decode(gen_ids) == generation
    assert not any("\ufffd" in piece for piece in pieces)


# A character split across tokens is emitted whole, by the token that completes it.
def test_split_character_is_held_back_then_emitted_whole(tokenizer):
    gen_ids = _encode(tokenizer, "a😀b")
    pieces = _stream(tokenizer, [], gen_ids, 1)
    assert [p for p in pieces if p] == ["a", "😀", "b"]
    assert pieces.count("") == len(gen_ids) - 3


# The first generated token keeps its leading space as a continuation of the prompt.
def test_leading_space_continues_the_prompt(tokenizer):
    prompt_ids, gen_ids = _encode(tokenizer, "def"), _encode(tokenizer, " f(x)")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    first = detok.add(gen_ids[:1])
    assert first.startswith(" ")
    full = tokenizer.decode(prompt_ids + gen_ids)
    assert first + "".join(detok.add([t]) for t in gen_ids[1:]) == full[len("def") :]


# The end-of-text token is skipped by default and kept on request.
def test_special_tokens(tokenizer):
    eos = tokenizer.eos_token_id
    gen_ids = _encode(tokenizer, " ok") + [eos]
    assert "".join(_stream(tokenizer, [], gen_ids, 1)) == " ok"
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    assert "".join(detok.add([t]) for t in gen_ids) == " ok" + tokenizer.eos_token


# A generation that ends inside a character: add() holds it back, flush() releases it.
def test_flush_releases_unfinished_character(tokenizer):
    gen_ids = _encode(tokenizer, "x😀")[:-1]  # drop the emoji's last byte token
    detok = IncrementalDetokenizer(tokenizer, [])
    assert "".join(detok.add([t]) for t in gen_ids) == "x"
    tail = detok.flush()
    assert tail.startswith("\ufffd")
    assert detok.text == tokenizer.decode(gen_ids)
    assert detok.flush() == ""


# Random token ids (invalid UTF-8 included): streamed text plus flush equals one-shot decode,
# and nothing is emitted with a trailing U+FFFD.
def test_random_ids_stream_equals_decode(tokenizer):
    rng = random.Random(0)
    vocab = list(range(1, 400))  # low ids: single bytes and short merges, many partial chars
    for _ in range(50):
        prompt_ids = _encode(tokenizer, "x = ")
        gen_ids = [rng.choice(vocab) for _ in range(rng.randint(1, 30))]
        detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        pieces = [detok.add(gen_ids[i : i + 3]) for i in range(0, len(gen_ids), 3)]
        assert not any(p.endswith("\ufffd") for p in pieces)
        assert "".join(pieces) + detok.flush() == tokenizer.decode(gen_ids)


# The window stays short: the detokenizer does not keep the whole sequence.
def test_window_stays_short(tokenizer):
    gen_ids = _encode(tokenizer, " x = 1\n" * 200)
    detok = IncrementalDetokenizer(tokenizer, _encode(tokenizer, "y = 0\n" * 50))
    for t in gen_ids:
        detok.add([t])
        assert len(detok._token_ids) <= 8
    assert detok.text == tokenizer.decode(gen_ids)
