"""Verification (`shared.rejection`) and sampling (`shared.sampling`).

The verifier accepts the draft's prefix equal to the target's own tokens; the target's token
at a sampled position is an inverse-CDF draw with the (seed, position) uniform. χ² tests check
the lossless guarantee (the drawn tokens follow p), and a deliberately wrong sampler (the
uniform applied to a shifted distribution) shows the χ² test can fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from shared.errors import InvalidArgumentError
from shared.rejection import accept_prefix
from shared.sampling import (
    SamplingParams,
    logits_to_probs,
    position_noise,
    sample_at,
    sample_from_probs,
)

VOCAB_SIZE = 8
NUM_SAMPLES = 20_000
P0 = [0.30, 0.20, 0.15, 0.10, 0.10, 0.08, 0.05, 0.02]  # every expected count >= 400


def one_hot_probs(token_ids: list[int], vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    """[len(token_ids), vocab_size] rows that put all mass on the given tokens."""
    return torch.nn.functional.one_hot(torch.tensor(token_ids), vocab_size).float()


def probs(rows: list[list[float]]) -> torch.Tensor:  # [num_rows, vocab_size]
    return torch.tensor(rows, dtype=torch.float32)


########################### accept_prefix ###########################


@pytest.mark.parametrize(
    "draft,target,expected",
    [
        ([], [7], 0),  # no draft: the target's token only
        ([1, 2, 3], [1, 2, 3, 4], 3),  # all accepted, then the bonus
        ([1, 2, 3], [1, 5, 3, 4], 1),  # first mismatch at 1: later matches do not count
        ([1, 2, 3], [9, 2, 3, 4], 0),
    ],
)
def test_accept_prefix_table(draft, target, expected):
    assert accept_prefix(draft, target) == expected


def test_accept_prefix_shape_mismatch():
    with pytest.raises(AssertionError):
        accept_prefix([1, 2], [1, 2])


########################### position_noise ###########################


def test_position_noise_depends_only_on_seed_and_position():
    a = position_noise([5, 5, 6], [10, 11, 10], VOCAB_SIZE)  # [3, vocab]
    again = position_noise([6, 5], [10, 10], VOCAB_SIZE)  # other order, other company
    assert torch.equal(a[2], again[0]) and torch.equal(a[0], again[1])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    big = position_noise([2**64 - 1], [0], VOCAB_SIZE)  # a uint64 seed
    assert (big > 0).all()
    e = position_noise([3] * 2000, range(2000), VOCAB_SIZE).flatten().numpy()
    assert abs(e.mean() - 1.0) < 0.02  # Exp(1)
    counts = np.histogram(np.exp(-e), bins=10, range=(0, 1))[0]  # exp(-E) ~ U(0, 1)
    assert chisquare(counts).pvalue > 1e-3


########################### sample_at: distribution (χ²) ###########################


def _draws(sampler, p: torch.Tensor, seeds) -> np.ndarray:
    logits = p.log().expand(len(seeds), -1)  # [n, vocab]
    params = [SamplingParams(temperature=1.0, seed=s) for s in seeds]
    return sampler(logits, params, [1] * len(seeds), [0] * len(seeds)).numpy()


def _chi2_pvalue(draws: np.ndarray, expected_probs: list[float]) -> float:
    counts = np.bincount(draws, minlength=VOCAB_SIZE)
    expected = np.asarray(expected_probs)
    return float(chisquare(counts, expected / expected.sum() * counts.sum()).pvalue)


def test_sample_at_follows_p():
    draws = _draws(sample_at, probs([P0])[0], range(NUM_SAMPLES))
    assert _chi2_pvalue(draws, P0) > 1e-3


def _shifted_sample_at(logits, params, counts, first_positions):
    """WRONG on purpose: draws from p shifted by one token."""
    return (sample_at(logits, params, counts, first_positions) + 1) % VOCAB_SIZE


def test_chi2_detects_a_wrong_sampler():
    draws = _draws(_shifted_sample_at, probs([P0])[0], range(NUM_SAMPLES))
    assert _chi2_pvalue(draws, P0) < 1e-6


def test_a_draft_with_the_same_noise_is_the_targets_draw_when_q_is_p():
    # Gumbel-max coupling: q == p → the drafter's race and the target's pick the same token
    p = probs([P0])[0]
    noise = position_noise(list(range(500)), [7] * 500, VOCAB_SIZE)  # [500, vocab]
    drafts = torch.argmax(p / noise, dim=-1)
    targets = sample_at(p.log().expand(500, -1), [SamplingParams(temperature=1.0, seed=s) for s in range(500)],
                        [1] * 500, [7] * 500)  # fmt: skip
    assert torch.equal(drafts, targets)


def test_sample_at_mixes_greedy_and_sampled_requests_by_rows():
    logits = torch.log(probs([P0, P0, [0.0, 0.5, 0.0, 0.25, 0.0, 0.25, 0.0, 0.0], P0]))  # [4, V]
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=3, seed=2), SamplingParams(temperature=0.7, seed=3)]
    # row 0: greedy (1 position); row 1: 2 positions; row 2: 1 position
    out = sample_at(logits, params, [1, 2, 1], [0, 5, 0])
    assert out[0] == 0  # argmax
    assert 0 <= int(out[3]) < VOCAB_SIZE
    many = sample_at(logits[2:3].expand(3000, -1), [params[1]], [3000], [0])
    assert set(many.tolist()) == {1, 3, 5}  # p = 0 is never drawn, top-k 3 keeps all three


########################### sample_from_probs ###########################


# One-hot rows are deterministic; zero-probability tokens are never drawn.
def test_sample_from_probs():
    generator = torch.Generator().manual_seed(0)
    assert sample_from_probs(one_hot_probs([3, 6]), generator).tolist() == [3, 6]
    row = probs([[0.0, 0.5, 0.0, 0.25, 0.0, 0.25, 0.0, 0.0]])
    draws = sample_from_probs(row.expand(5000, -1), generator)
    assert set(draws.tolist()) == {1, 3, 5}
    counts = np.bincount(draws.numpy(), minlength=VOCAB_SIZE)[[1, 3, 5]]
    assert chisquare(counts, [2500, 1250, 1250]).pvalue > 1e-3


########################### logits_to_probs ###########################

LOGITS = [math.log(p) for p in [0.5, 0.3, 0.15, 0.05]]  # softmax(LOGITS) == these probs


def _close(actual: torch.Tensor, expected: list[float]) -> bool:
    return torch.allclose(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-5)


@pytest.mark.parametrize(
    "params,expected",
    [
        # greedy: one-hot argmax
        (SamplingParams(temperature=0.0), [1, 0, 0, 0]),
        # temperature 1: the softmax itself
        (SamplingParams(temperature=1.0), [0.5, 0.3, 0.15, 0.05]),
        # temperature 0.5 squares the probabilities (then renormalises)
        (SamplingParams(temperature=0.5), [x / 0.365 for x in (0.25, 0.09, 0.0225, 0.0025)]),
        # top-k keeps the k largest and renormalises
        (SamplingParams(temperature=1.0, top_k=2), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
        (SamplingParams(temperature=1.0, top_k=1), [1, 0, 0, 0]),
        (SamplingParams(temperature=1.0, top_k=4), [0.5, 0.3, 0.15, 0.05]),  # k = vocab: off
        (SamplingParams(temperature=1.0, top_k=9), [0.5, 0.3, 0.15, 0.05]),  # k > vocab: off
        # top-p keeps a token while the mass before it is < top_p
        (SamplingParams(temperature=1.0, top_p=0.6), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
        (SamplingParams(temperature=1.0, top_p=0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
        (SamplingParams(temperature=1.0, top_p=0.45), [1, 0, 0, 0]),
        # the top token is always kept, however small top_p is
        (SamplingParams(temperature=1.0, top_p=1e-6), [1, 0, 0, 0]),
        # top-k first, then top-p over the renormalised survivors: token 2 has mass 0.8
        # before it in the full distribution but 0.8 / 0.95 > 0.82 after top-k
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.82), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
        (SamplingParams(temperature=1.0, top_p=0.82), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
    ],
)
def test_logits_to_probs_table(params, expected):
    out = logits_to_probs(torch.tensor(LOGITS), params)
    assert out.dtype == torch.float32
    assert _close(out, expected), out


# Works on any leading shape; rows sum to 1.
def test_logits_to_probs_batched_rows_sum_to_one():
    logits = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    for params in (SamplingParams(), SamplingParams(temperature=0.7, top_k=5, top_p=0.8)):
        out = logits_to_probs(logits, params)
        assert out.shape == logits.shape
        assert torch.allclose(out.sum(-1), torch.ones(2, 3))
        assert torch.equal(out.argmax(-1), logits.argmax(-1))  # the top token survives


########################### SamplingParams.validate ###########################


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.2}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_sampling_params_validate_rejects(kwargs, field):
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(**kwargs).validate()
    assert info.value.field == field
    assert field in str(info.value)


@pytest.mark.parametrize(
    "kwargs,greedy",
    [
        ({}, True),
        ({"temperature": 0.7, "top_p": 1.0, "top_k": 0, "seed": 3}, False),
        ({"temperature": 1e-3, "top_p": 1e-3, "top_k": 1}, False),
    ],
)
def test_sampling_params_validate_accepts(kwargs, greedy):
    params = SamplingParams(**kwargs)
    params.validate()
    assert params.greedy == greedy
