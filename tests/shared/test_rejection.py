"""Verification (`shared.rejection`) and sampling (`shared.sampling`).

Tiny hand-built distributions force outcomes; one χ² test per draft kind checks the
lossless guarantee (the first emitted token is distributed as target_probs[0]), and a
deliberately wrong sampler (p and q swapped in the accept test) shows the χ² test can fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from shared.errors import InvalidArgumentError
from shared.rejection import greedy_accept, rejection_sample
from shared.sampling import SamplingParams, logits_to_probs, make_generator, sample_from_probs

VOCAB_SIZE = 8
NUM_SAMPLES = 20_000
# Target and draft distributions for the χ² tests: far apart, every p(x) large enough
# that each expected count is >= 400.
P0 = [0.30, 0.20, 0.15, 0.10, 0.10, 0.08, 0.05, 0.02]
Q0 = [0.02, 0.05, 0.08, 0.10, 0.10, 0.15, 0.20, 0.30]


def one_hot_probs(token_ids: list[int], vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    """[len(token_ids), vocab_size] rows that put all mass on the given tokens."""
    return torch.nn.functional.one_hot(torch.tensor(token_ids), vocab_size).float()


def probs(rows: list[list[float]]) -> torch.Tensor:  # [num_rows, vocab_size]
    return torch.tensor(rows, dtype=torch.float32)


########################### greedy_accept ###########################


@pytest.mark.parametrize(
    "draft,target_argmax,expected_tokens,expected_num_accepted",
    [
        ([1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4], 3),  # all accepted, then the bonus token
        ([1, 2, 3], [5, 2, 3, 4], [5], 0),  # first rejected: only the target's token
        ([1, 2, 3], [1, 7, 3, 4], [1, 7], 1),  # middle rejected: later matches don't count
        ([1, 2, 3], [1, 2, 9, 4], [1, 2, 9], 2),  # last rejected
        ([4], [4, 0], [4, 0], 1),  # k = 1, accepted
        ([], [6], [6], 0),  # k = 0: plain decoding step
    ],
)
def test_greedy_accept_table(draft, target_argmax, expected_tokens, expected_num_accepted):
    tokens, num_accepted = greedy_accept(draft, torch.tensor(target_argmax))
    assert tokens == expected_tokens
    assert num_accepted == expected_num_accepted
    assert len(tokens) == num_accepted + 1


# The target must score k + 1 positions.
def test_greedy_accept_shape_mismatch():
    with pytest.raises(AssertionError):
        greedy_accept([1, 2], torch.tensor([1, 2]))


########################### rejection_sample: forced outcomes ###########################


@pytest.mark.parametrize(
    "draft,target_tokens,expected_tokens,expected_num_accepted",
    [
        ([1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4], 3),  # p(x) = 1 everywhere: all + bonus
        ([1, 2, 3], [5, 2, 3, 4], [5], 0),  # p(x) = 0: rejected, recovered = p's token
        ([1, 2, 3], [1, 6, 3, 4], [1, 6], 1),  # rejected in the middle
        ([], [7], [7], 0),  # k = 0: one token from p
    ],
)
@pytest.mark.parametrize("with_draft_probs", [False, True])
@pytest.mark.parametrize("seed", [0, 1, None])
def test_rejection_sample_one_hot_target(
    draft, target_tokens, expected_tokens, expected_num_accepted, with_draft_probs, seed
):
    # One-hot p makes the outcome certain whatever the random draws (and q one-hot on drafts).
    draft_probs = None
    if with_draft_probs:
        draft_probs = one_hot_probs(draft) if draft else torch.zeros(0, VOCAB_SIZE)
    tokens, num_accepted = rejection_sample(
        draft, draft_probs, one_hot_probs(target_tokens), make_generator(seed)
    )
    assert tokens == expected_tokens
    assert num_accepted == expected_num_accepted


# q(x) > p(x) = 0 for the drafted token: always rejected, recovered from p alone.
def test_rejection_sample_zero_target_prob_is_never_accepted():
    target_probs = probs([[0.0, 0.5, 0.5, 0, 0, 0, 0, 0], [1.0] + [0.0] * 7])
    draft_probs = probs([[0.9, 0.1, 0, 0, 0, 0, 0, 0]])
    generator = make_generator(0)
    for _ in range(200):
        tokens, num_accepted = rejection_sample([0], draft_probs, target_probs, generator)
        assert num_accepted == 0 and tokens[0] in (1, 2)


# The uniform draw u can be exactly 0.0 (torch.rand is in [0, 1)): the accept test must be
# strict (u * q < p), or a token the target gives probability 0 would be accepted.
@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_rejection_sample_u_zero_rejects_zero_prob_draft(monkeypatch, with_draft_probs):
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.zeros(args[0]))
    target_probs = one_hot_probs([5, 4])
    draft_probs = one_hot_probs([3]) if with_draft_probs else None
    tokens, num_accepted = rejection_sample([3], draft_probs, target_probs, make_generator(0))
    assert (tokens, num_accepted) == ([5], 0)


# Shapes are checked at entry.
@pytest.mark.parametrize(
    "draft,draft_probs,target_probs",
    [
        ([1, 2], None, torch.ones(2, VOCAB_SIZE) / VOCAB_SIZE),  # target needs k + 1 rows
        ([1], torch.ones(2, VOCAB_SIZE) / VOCAB_SIZE, torch.ones(2, VOCAB_SIZE) / VOCAB_SIZE),
    ],
)
def test_rejection_sample_shape_mismatch(draft, draft_probs, target_probs):
    with pytest.raises(AssertionError):
        rejection_sample(draft, draft_probs, target_probs)


########################### rejection_sample: distribution (χ²) ###########################


def _swapped_rejection_sample(draft_token_ids, draft_probs, target_probs, generator):
    """WRONG on purpose: accepts with min(1, q/p) instead of min(1, p/q) (k = 1 only)."""
    x = draft_token_ids[0]
    q_full = draft_probs[0] if draft_probs is not None else one_hot_probs([x])[0]
    p, q = target_probs[0, x], q_full[x]
    u = torch.rand(1, generator=generator)
    if bool(u * p < q):
        return [x, int(sample_from_probs(target_probs[1], generator))], 1
    residual = torch.clamp(target_probs[0] - q_full, min=0.0)
    return [int(sample_from_probs(residual / residual.sum(), generator))], 0


def _emitted_counts(
    sampler, target_probs: torch.Tensor, draft_rows: torch.Tensor, deterministic: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the first and second emitted token over NUM_SAMPLES rounds.

    target_probs: [k + 1, vocab_size] p; draft_rows: [k, vocab_size] q. Deterministic
    drafts are argmax(q) with draft_probs=None; otherwise drafts are sampled from q.
    """
    k = draft_rows.shape[0]
    draft_gen = make_generator(1234)
    if deterministic:
        drafts = draft_rows.argmax(-1).repeat(NUM_SAMPLES, 1)  # [NUM_SAMPLES, k]
    else:
        drafts = torch.multinomial(draft_rows, NUM_SAMPLES, replacement=True, generator=draft_gen).T
    draft_probs = None if deterministic else draft_rows
    generator = make_generator(4321)
    first = np.zeros(VOCAB_SIZE, dtype=np.int64)
    second = np.zeros(VOCAB_SIZE, dtype=np.int64)
    for draft in drafts.tolist():
        tokens, _ = sampler(draft[:k], draft_probs, target_probs, generator)
        first[tokens[0]] += 1
        if len(tokens) > 1:
            second[tokens[1]] += 1
    return first, second


def _chi2_pvalue(counts: np.ndarray, expected_probs: torch.Tensor) -> float:
    expected = expected_probs.double().numpy()
    return float(chisquare(counts, expected / expected.sum() * counts.sum()).pvalue)


# Lossless: drafts sampled from a real q (draft_probs given) or argmax drafts (one-hot q);
# the first emitted token follows p[0] and, when present, the second follows p[1].
@pytest.mark.parametrize("deterministic", [False, True])
def test_rejection_sample_recovers_target_distribution(deterministic):
    target_probs = probs([P0, P0[::-1], P0[2:] + P0[:2]])  # [k + 1 = 3, vocab_size]
    draft_rows = probs([Q0, Q0[3:] + Q0[:3]])  # [k = 2, vocab_size]
    first, second = _emitted_counts(rejection_sample, target_probs, draft_rows, deterministic)
    assert _chi2_pvalue(first, target_probs[0]) > 1e-3
    assert second.sum() > 300  # enough rounds accepted the first draft (argmax: p = 0.02)
    assert _chi2_pvalue(second, target_probs[1]) > 1e-3


# The χ² test has power: swapping p and q in the accept test is detected.
@pytest.mark.parametrize("deterministic", [False, True])
def test_chi2_rejects_swapped_acceptance(deterministic):
    target_probs = probs([P0, P0[::-1]])  # [k + 1 = 2, vocab_size]
    draft_rows = probs([Q0])  # [k = 1, vocab_size]
    first, _ = _emitted_counts(_swapped_rejection_sample, target_probs, draft_rows, deterministic)
    assert _chi2_pvalue(first, target_probs[0]) < 1e-6


########################### seeded determinism ###########################


def _seeded_run(seed: int | None, draft_probs: torch.Tensor | None) -> list[tuple[list[int], int]]:
    rng = torch.Generator().manual_seed(99)  # fixed inputs; only the sampler's seed varies
    target_probs = torch.softmax(torch.randn(5, VOCAB_SIZE, generator=rng), -1)  # [k + 1, V]
    generator = make_generator(seed)
    return [
        rejection_sample([1, 2, 3, 4], draft_probs, target_probs, generator) for _ in range(50)
    ]


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_rejection_sample_seeded_determinism(with_draft_probs):
    rng = torch.Generator().manual_seed(7)
    draft_probs = (
        torch.softmax(torch.randn(4, VOCAB_SIZE, generator=rng), -1) if with_draft_probs else None
    )
    # same seed -> the same 50 rounds; a different seed -> different rounds
    assert _seeded_run(123, draft_probs) == _seeded_run(123, draft_probs)
    assert _seeded_run(123, draft_probs) != _seeded_run(124, draft_probs)


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(5), make_generator(5)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


########################### sample_from_probs ###########################


# One-hot rows are deterministic; zero-probability tokens are never drawn.
def test_sample_from_probs():
    generator = make_generator(0)
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
