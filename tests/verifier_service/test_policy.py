"""The adaptive-k policy: ±2/−1 warm-up, cost model, turning itself off and back on."""

from __future__ import annotations

import random

import pytest

from verifier_service.policy import AdaptiveKPolicy, FixedKPolicy

STEP_S = 0.008  # one plain target step


def simulate(policy, rounds: int, accept_first: float, accept_rest: float, draft_s: float, seed: int = 0) -> list[int]:
    """Drive the policy with a synthetic drafter; returns the k chosen each round."""
    rng = random.Random(seed)
    ks = []
    for _ in range(rounds):
        k = policy.next_k()
        ks.append(k)
        num_accepted = 0
        while num_accepted < k and rng.random() < (accept_first if num_accepted == 0 else accept_rest):
            num_accepted += 1
        policy.update(k, num_accepted, draft_s * k, STEP_S * (1 + 0.08 * k))
    return ks


def test_fixed_policy_never_adapts():
    policy = FixedKPolicy(4)
    assert simulate(policy, 20, 0.0, 0.0, 0.01) == [4] * 20


def test_warmup_follows_plus_two_minus_one():
    # first round measures plain decoding; then all accepted -> k + 2, a rejection -> k - 1
    policy = AdaptiveKPolicy(initial_k=3, max_k=10)
    assert policy.next_k() == 0
    policy.update(0, 0, 0.0, STEP_S)
    assert policy.next_k() == 3
    policy.update(3, 3, 0.001, STEP_S)
    assert policy.next_k() == 5
    policy.update(5, 1, 0.001, STEP_S)
    assert policy.next_k() == 4


def test_turns_speculation_off_when_it_does_not_pay():
    # drafts that are almost never accepted and cost a quarter step each
    ks = simulate(AdaptiveKPolicy(5, 10), 300, 0.05, 0.05, STEP_S / 4)
    assert sum(k == 0 for k in ks[100:]) > 0.8 * 200


def test_turns_back_on_when_drafts_get_good():
    policy = AdaptiveKPolicy(5, 10)
    simulate(policy, 200, 0.05, 0.05, STEP_S / 4)
    ks = simulate(policy, 300, 0.9, 0.95, STEP_S / 50, seed=1)
    assert sum(k > 0 for k in ks[-100:]) > 80


def mean_spec_k(draft_s: float) -> float:
    ks = simulate(AdaptiveKPolicy(5, 10), 300, 0.7, 0.9, draft_s)
    spec = [k for k in ks[100:] if k > 0]
    return sum(spec) / len(spec)


def test_cheaper_drafts_buy_longer_drafts():
    # n-gram-like (free) drafts run deeper than drafts costing half a target step
    assert mean_spec_k(STEP_S / 500) > mean_spec_k(STEP_S / 2) + 1


def test_heuristic_policy_depends_on_acceptance_only():
    # same acceptance sequence, wildly different timings -> same k schedule
    from verifier_service.policy import HeuristicKPolicy

    def schedule(time_scale: float) -> list[int]:
        policy, ks = HeuristicKPolicy(3, 10), []
        for num_accepted in [3, 5, 0, 1, 6, 6, 2]:
            k = policy.next_k()
            ks.append(k)
            policy.update(k, min(num_accepted, k), 0.01 * time_scale, 0.02 * time_scale)
        return ks

    assert schedule(1.0) == schedule(100.0) == [3, 5, 7, 6, 5, 7, 6]


def test_fork_of_an_off_policy_probes_first():
    # a new request inheriting k = 0 tries speculation in its first round
    policy = AdaptiveKPolicy(5, 10)
    simulate(policy, 200, 0.02, 0.02, STEP_S / 4)
    assert policy.k == 0
    assert policy.fork().next_k() == 1
