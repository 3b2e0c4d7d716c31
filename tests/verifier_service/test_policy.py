"""`RulePolicy`: the configured rule per method, a request's own k and drafter params, the
±2/−1 rule, several rows in one step, the measured step cost line and the load-aware cap."""

from __future__ import annotations

import pytest

from shared.config import MethodSpeculation, SpeculationConfig
from shared.types import GenerationRequest
from shared.sampling import SamplingParams
from verifier_service.policy import (
    RowOutcome,
    RulePolicy,
    StepCost,
    StepCostModel,
    expected_tokens,
    plus_two_minus_one,
)

CONFIG = SpeculationConfig(
    methods={
        "ngram": MethodSpeculation(num_speculative_tokens=5),
        "draft_model": MethodSpeculation(rule="plus2minus1", num_speculative_tokens=3),
        "sorted": MethodSpeculation(num_speculative_tokens=4, drafter_params={"fixed_exit": 2.0}),
    },
    max_speculative_tokens=8,
    load_aware=False,  # the rules alone; the cap has its own tests below
)


def step(policy, rows, outcomes, seconds=0.01):
    num_tokens = sum(o.num_draft_tokens + 1 for o in outcomes)
    policy.observe(rows, outcomes, StepCost(len(rows), num_tokens, seconds))


def test_fixed_rule_keeps_k_whatever_the_acceptance():
    policy = RulePolicy(CONFIG)
    row = policy.start(GenerationRequest(prompt_ids=[1], method="ngram"))
    ks = []
    for accepted in (0, 5, 2, 5, 0):
        (plan,) = policy.plan([row])
        ks.append(plan.k)
        step(policy, [row], [RowOutcome(plan.k, accepted)])
    assert ks == [5] * 5


@pytest.mark.parametrize(
    ("k", "num_draft", "num_accepted", "expected"),
    [
        (3, 3, 3, 5),  # all accepted: + 2
        (3, 3, 1, 2),  # a rejection: − 1
        (1, 1, 0, 1),  # floor 1
        (7, 7, 7, 8),  # cap max_k
        (5, 2, 2, 5),  # a short draft, all accepted: k stays (the drafter found no more)
        (5, 2, 1, 4),  # a short draft with a rejection: − 1
    ],
)
def test_plus_two_minus_one(k, num_draft, num_accepted, expected):
    assert plus_two_minus_one(k, num_draft, num_accepted, max_k=8) == expected


def test_plus2minus1_rule_follows_acceptance_and_ignores_empty_drafts():
    policy = RulePolicy(CONFIG)
    row = policy.start(GenerationRequest(prompt_ids=[1], method="draft_model"))
    ks = []
    for accept_all in (True, True, False, None, False):
        (plan,) = policy.plan([row])
        ks.append(plan.k)
        if accept_all is None:  # the drafter was late: nothing verified, nothing learned
            step(policy, [row], [RowOutcome(0, 0)])
        else:
            step(policy, [row], [RowOutcome(plan.k, plan.k if accept_all else 0)])
    assert ks == [3, 5, 7, 6, 6]
    assert policy.plan([row])[0].k == 5


def test_request_k_and_params_override_the_method_and_params_are_sent_once():
    policy = RulePolicy(CONFIG)
    row = policy.start(GenerationRequest(prompt_ids=[1], method="sorted", num_speculative_tokens=2,
                                         drafter_params={"threshold.1": 0.5}))  # fmt: skip
    first, second = policy.plan([row])[0], policy.plan([row])[0]
    assert first.k == second.k == 2
    assert first.params == {"fixed_exit": 2.0, "threshold.1": 0.5}
    assert second.params is None  # sticky on the proposer's side
    summary = policy.summary(row)
    assert summary["k"] == 2 and summary["fixed_exit"] == 2.0


def test_none_and_unconfigured_methods_never_speculate():
    policy = RulePolicy(SpeculationConfig(methods={}))
    for method in ("none", "ngram"):
        row = policy.start(GenerationRequest(prompt_ids=[1], method=method))
        assert policy.plan([row])[0].k == 0


def test_several_rows_in_one_step_each_follow_their_rule():
    policy = RulePolicy(CONFIG)
    rows = [policy.start(GenerationRequest(prompt_ids=[1], method=m)) for m in ("ngram", "draft_model", "none")]
    plans = policy.plan(rows)
    assert [p.k for p in plans] == [5, 3, 0]
    step(policy, rows, [RowOutcome(5, 0), RowOutcome(3, 3), RowOutcome(0, 0)])
    assert [p.k for p in policy.plan(rows)] == [5, 5, 0]


def test_step_cost_line_is_fitted_from_steps_of_different_sizes():
    model = StepCostModel()
    assert model.line() is None
    for _ in range(4):
        model.observe(StepCost(1, 1, 0.0025))
    assert model.line() is None  # one size only: no slope yet
    for n in (4, 16, 64, 128, 8):
        model.observe(StepCost(1, n, 0.002 + 0.0005 * n))
    a, b = model.line()
    assert a == pytest.approx(0.002, rel=1e-3) and b == pytest.approx(0.0005, rel=1e-3)


def test_expected_tokens():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 3) == 4.0


def _rows(policy, n: int, accepted: tuple[int, int], **kw):
    """n ngram rows (k = 5) that accepted `accepted[0]` of `accepted[1]` drafts, many rounds;
    then the step cost line a + b·n is all the policy knows of step times."""
    rows = [policy.start(GenerationRequest(prompt_ids=[1], method="ngram", **kw)) for _ in range(n)]
    for row in rows:
        for _ in range(20):
            policy.observe([row], [RowOutcome(accepted[1], accepted[0])], StepCost(1, 4, 0.0))
    return rows


def _measured(policy, a: float, b: float) -> RulePolicy:
    policy.step_cost = StepCostModel()
    for n in (1, 2, 4, 8, 16, 32, 64, 128):
        policy.step_cost.observe(StepCost(1, n, a + b * n))
    return policy


LOAD_AWARE = CONFIG.model_copy(update={"load_aware": True})


def test_a_lone_row_keeps_its_k_when_steps_cost_mostly_overhead():
    policy = RulePolicy(LOAD_AWARE)
    (row,) = _rows(policy, 1, accepted=(2, 5))
    _measured(policy, a=0.010, b=0.0001)  # 1 row x 6 tokens: 1.05 x a one-token step
    assert [p.k for p in policy.plan([row])] == [5]


def test_a_full_batch_drops_drafts_that_do_not_pay_and_keeps_those_that_do():
    policy = RulePolicy(LOAD_AWARE)
    rows = _rows(policy, 32, accepted=(0, 5))  # never accepted
    _measured(policy, a=0.002, b=0.0005)  # compute-bound: every token costs
    assert {p.k for p in policy.plan(rows)} == {0}
    policy = RulePolicy(LOAD_AWARE)
    good = _rows(policy, 32, accepted=(5, 5))  # always accepted: 6 tokens for 6 fed
    _measured(policy, a=0.002, b=0.0005)
    assert {p.k for p in policy.plan(good)} == {5}
    assert policy.summary(good[0])["load_cap"] == 5.0


def test_a_pinned_k_is_never_cut():
    policy = RulePolicy(LOAD_AWARE)
    rows = _rows(policy, 32, accepted=(0, 5), num_speculative_tokens=4)
    _measured(policy, a=0.002, b=0.0005)
    assert {p.k for p in policy.plan(rows)} == {4}


def test_greedy_requests_get_the_methods_greedy_settings():

    config = SpeculationConfig(methods={"sorted": MethodSpeculation(
        num_speculative_tokens=3, drafter_params={"fixed_exit": 2.0},
        when_greedy=MethodSpeculation(num_speculative_tokens=7, drafter_params={"fixed_exit": 1.0}),
    )})  # fmt: skip
    policy = RulePolicy(config)
    greedy = policy.start(GenerationRequest(prompt_ids=[1], method="sorted"))
    sampled = policy.start(GenerationRequest(prompt_ids=[1], method="sorted", sampling=SamplingParams(temperature=0.8)))
    assert (greedy.k, greedy.params) == (7, {"fixed_exit": 1.0})
    assert (sampled.k, sampled.params) == (3, {"fixed_exit": 2.0})


def test_greedy_settings_are_bounded_and_one_level_deep():
    with pytest.raises(ValueError, match="when_greedy.num_speculative_tokens"):
        SpeculationConfig(methods={"ngram": MethodSpeculation(
            num_speculative_tokens=3, when_greedy=MethodSpeculation(num_speculative_tokens=12))})  # fmt: skip
    with pytest.raises(ValueError, match="its own when_greedy"):
        MethodSpeculation(num_speculative_tokens=3, when_greedy=MethodSpeculation(
            num_speculative_tokens=3, when_greedy=MethodSpeculation(num_speculative_tokens=3)))  # fmt: skip


def test_a_cut_batch_still_probes_its_drafts_now_and_then():
    policy = RulePolicy(LOAD_AWARE)
    rows = _rows(policy, 32, accepted=(0, 5))
    _measured(policy, a=0.002, b=0.0005)
    ks = [policy.plan(rows)[0].k for _ in range(2 * RulePolicy.PROBE_EVERY)]
    assert ks.count(5) == 2 and ks.count(0) == len(ks) - 2
    assert [p.k for p in policy.plan(rows[:3])] == [5, 5, 5]  # a few rows: never cut
