"""`RulePolicy`: the configured rule per method, a request's own k and drafter params, the
±2/−1 rule, several rows in one step, and drafting on or off per batch size and method by
measured goodput."""

from __future__ import annotations

import pytest

from shared.config import MethodSpeculation, SpeculationConfig
from shared.types import GenerationRequest
from shared.sampling import SamplingParams
from verifier_service.policy import LoadArms, RowOutcome, RulePolicy, StepCost, plus_two_minus_one

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


LOAD_AWARE = CONFIG.model_copy(update={"load_aware": True})


def test_load_arms_measure_then_take_the_better_and_probe_the_other():
    arms = LoadArms(min_probe_gap=2, warmup_steps=0)
    key = (32, "ngram", True)
    assert arms.choose(key) == (True, False)  # unmeasured: drafting first
    arms.observe(key, True, False, tokens=64, seconds=0.1)  # 640 tok/s
    assert arms.choose(key) == (False, False)  # then plain
    arms.observe(key, False, False, tokens=32, seconds=0.04)  # 800 tok/s
    assert arms.choose(key) == (False, False)  # plain is better
    assert arms.choose(key) == (True, True)  # a probe takes the other
    assert arms.choose((16, "ngram", True)) == (True, False)  # another batch size has its own
    assert arms.choose((2, "sorted", True)) == (True, False)  # and another method
    assert arms.choose((32, "ngram", False)) == (True, False)  # and another sampling mode
    assert [LoadArms.bucket(n) for n in (1, 3, 4, 5, 31, 32, 63)] == [1, 2, 4, 4, 16, 32, 32]


def _run(arms: LoadArms, key, num_steps: int, on: float, off: float) -> int:
    """Probes taken over `num_steps` one-second steps at the given tok/s per arm."""
    probes = 0
    for _ in range(num_steps):
        drafting, probe = arms.choose(key)
        arms.observe(key, drafting, probe, tokens=on if drafting else off, seconds=1.0)
        probes += probe
    return probes


def test_probes_stay_within_their_share_of_time():
    share = 0.05
    costly, cheap = (LoadArms(probe_share=share, min_probe_gap=2, max_probe_gap=32, warmup_steps=0) for _ in range(2))
    key = (8, "ngram", False)
    # a drafting step that loses badly (a probe step wastes 3/4 of its second; a probe of
    # drafting is a run of 2 steps without warm-up) is probed rarely ...
    num_costly = _run(costly, key, 400, on=100, off=400)
    arms = costly.arms[key]
    assert arms.regret_s <= share * arms.seconds + 2 * 0.75
    assert 4 <= num_costly <= 400 * share / 0.75 + 4
    # ... and a close one every min_probe_gap steps, which costs almost nothing
    assert _run(cheap, key, 400, on=390, off=400) >= 400 / 2 - 2
    # a drafter that got faster is noticed by the probes and taken
    _run(costly, key, 200, on=1000, off=400)
    assert costly.choose(key)[0] is True


def test_probes_of_a_clearly_losing_drafter_come_rarely_and_close_ones_often():
    arms = LoadArms(alpha=1.0, min_probe_gap=2, max_probe_gap=16, warmup_steps=0, probe_share=1.0)
    key = (8, "ngram", True)

    def probe_starts(steps: int, on: float) -> list[int]:
        starts, last = [], False
        for i in range(steps):
            drafting, probe = arms.choose(key)
            arms.observe(key, drafting, probe, tokens=on if drafting else 400, seconds=1.0)
            if probe and not last:
                starts.append(i)
            last = probe
        return starts

    starts = probe_starts(200, on=300)  # 25 % behind: from the first probe on, probed every 16 steps
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(gaps) >= 10 and set(gaps) == {16 + 1}  # (+ the probe's own step)
    starts = probe_starts(60, on=390)  # within the 10 % margin: probed every 2 steps again
    assert [b - a for a, b in zip(starts, starts[1:])][-5:] == [2 + 1] * 5


def test_a_pool_drafter_that_loses_by_a_little_is_probed_ever_more_rarely():
    arms = LoadArms(alpha=1.0, min_probe_gap=2, max_probe_gap=16, warmup_steps=0, probe_share=1.0)
    key = (1, "sorted", True)
    starts, last = [], False
    for i in range(120):
        drafting, probe = arms.choose(key)
        arms.observe(key, drafting, probe, tokens=390 if drafting else 400, seconds=1.0)  # within the margin
        if probe and not last:
            starts.append(i)
        last = probe
    # the gap doubles at each probe up to max_probe_gap (+ the probe's own step)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps[:3] == [4 + 1, 8 + 1, 16 + 1] and set(gaps[2:]) == {16 + 1}
    # an in-process drafter as close is probed every min_probe_gap steps (see above)


def test_after_the_arms_flip_the_other_one_is_probed_at_the_shortest_gap_again():
    arms = LoadArms(alpha=1.0, min_probe_gap=2, max_probe_gap=64, warmup_steps=0, probe_share=1.0)
    key = (1, "ngram", True)

    def run(steps: int, on: float) -> list[tuple[bool, bool]]:
        out = []
        for _ in range(steps):
            drafting, probe = arms.choose(key)
            arms.observe(key, drafting, probe, tokens=on if drafting else 400, seconds=1.0)
            out.append((drafting, probe))
        return out

    run(10, on=200)  # drafting loses by half: its probes back off to max_probe_gap
    assert arms.arms[key].probe_gap == 64
    arms.arms[key].steps_since_probe = 64  # a probe is due: drafting now wins it
    steps = run(12, on=800)
    assert steps[0] == (True, True) and arms.arms[key].drafting_best
    # plain is probed again after min_probe_gap steps, not after the 64 set while it won
    assert (False, True) in steps[1 : 1 + 2 + 1]


def test_a_new_batch_size_starts_plain_where_drafting_lost_at_a_smaller_one():
    arms = LoadArms(warmup_steps=0)
    small, large, larger = (4, "sorted", True), (16, "sorted", True), (32, "sorted", True)
    arms.choose(small)
    arms.observe(small, True, False, tokens=10, seconds=1.0)
    arms.choose(small)
    arms.observe(small, False, False, tokens=20, seconds=1.0)  # drafting lost at 4 rows
    assert arms.choose(large) == (False, False)  # so 16 rows start plain, measured from 4's
    assert arms.choose((16, "ngram", False)) == (True, False)  # sampled rows measured nothing yet
    arms.observe(large, False, False, tokens=5, seconds=1.0)
    arms.arms[large].goodput[True] = 50.0  # drafting won at 16 rows after all
    assert arms.choose(larger) == (True, False)  # so 32 rows measure from scratch


def test_a_pool_drafter_is_tried_at_more_than_two_rows_only_where_it_won_below():
    arms = LoadArms(warmup_steps=0)
    two, sixteen, thirty_two = (2, "sorted", True), (16, "sorted", True), (32, "sorted", True)
    assert arms.choose(thirty_two) == (False, False)  # nothing measured below: plain, no try
    assert arms.choose((32, "ngram", True)) == (True, False)  # an in-process drafter is tried
    assert arms.choose(two) == (True, False)  # 1-2 rows: tried
    arms.observe(two, True, False, tokens=30, seconds=1.0)
    arms.choose(two)
    arms.observe(two, False, False, tokens=20, seconds=1.0)  # drafting won at 2 rows
    assert arms.choose(sixteen) == (True, False)  # so 16 rows try it
    arms.observe(sixteen, True, False, tokens=10, seconds=1.0)
    arms.choose(sixteen)
    arms.observe(sixteen, False, False, tokens=20, seconds=1.0)  # and it lost there
    arms.observe(thirty_two, False, False, tokens=20, seconds=1.0)
    assert arms.choose(thirty_two) == (False, False)  # so 32 rows still do not


def test_no_probe_of_drafting_while_it_loses_at_a_smaller_batch():
    arms = LoadArms(min_probe_gap=2, max_probe_gap=8, warmup_steps=0)
    small, large = (4, "sorted", True), (32, "sorted", True)
    for key in (small, large):  # drafting loses at both sizes: 10 tok/s against 20
        arms.choose(key)
        arms.observe(key, True, False, tokens=10, seconds=1.0)
        arms.choose(key)
        arms.observe(key, False, False, tokens=20, seconds=1.0)
    assert _run(arms, large, 50, on=10, off=20) == 0  # 32 rows: never probed
    assert _run(arms, small, 50, on=10, off=20) > 0  # 4 rows: probed, so a change shows there
    _run(arms, small, 100, on=40, off=20)  # drafting now wins at 4 rows ...
    assert arms.choose(small)[0] is True
    assert _run(arms, large, 50, on=10, off=20) > 0  # ... so 32 rows are probed again


def test_a_step_that_prefilled_a_prompt_measures_nothing():
    policy = RulePolicy(LOAD_AWARE)
    policy.arms = LoadArms(warmup_steps=0)
    rows = [policy.start(GenerationRequest(prompt_ids=[1], method="ngram")) for _ in range(8)]
    plans = policy.plan(rows)
    assert plans[0].k == 5  # drafting is measured first
    # the step also fed two rows' prompt chunks: its time is mostly theirs
    policy.observe(rows, [RowOutcome(5, 0)] * 8, StepCost(10, 48 + 200, 0.5, num_prefill_rows=2))
    assert policy.arms.arms[(8, "ngram", True)].goodput == {}
    assert policy.plan(rows)[0].k == 5  # so drafting is still to be measured


def test_a_step_that_prefills_neither_explores_nor_starts_a_probe():
    """At 200 concurrent requests a batch of 31 decoding rows came only with a new request's
    prompt chunk: exploring there never measured drafting, and every such step drafted."""
    policy = RulePolicy(LOAD_AWARE)
    policy.arms = LoadArms(warmup_steps=0, min_probe_gap=2)
    rows = [policy.start(GenerationRequest(prompt_ids=[1], method="ngram")) for _ in range(8)]
    key = (8, "ngram", True)

    def prefill_step() -> int:
        k = policy.plan(rows, prefilling=True)[0].k
        policy.observe(rows, [RowOutcome(k, 0)] * 8, StepCost(9, 8 * (k + 1) + 100, 0.5, num_prefill_rows=1))
        return k

    assert [prefill_step() for _ in range(5)] == [0] * 5  # unmeasured arms: plain, and nothing measured
    assert policy.arms.arms[key].goodput == {}
    assert _step(policy, rows, tokens_per_row=1, seconds=0.04)[0] == 5  # a step without prefill explores
    assert _step(policy, rows, tokens_per_row=1, seconds=0.02)[0] == 0  # drafting 200 tok/s, plain 400
    assert [prefill_step() for _ in range(5)] == [0] * 5  # the better arm, no probe however long
    assert _step(policy, rows, tokens_per_row=1, seconds=0.02)[0] == 5  # the first measurable step probes


def test_drafting_after_plain_steps_warms_up_unmeasured_and_its_probes_run_long_enough():
    arms = LoadArms(min_probe_gap=2, warmup_steps=2)
    key = (1, "card", True)
    choices = []
    for _ in range(3):  # drafting, unmeasured until warm: it stays the unmeasured arm
        drafting, probe = arms.choose(key)
        arms.observe(key, drafting, probe, tokens=1, seconds=1.0)  # a cold drafter: 1 tok/s
        choices.append(drafting)
    assert choices == [True, True, True] and arms.arms[key].goodput == {True: 1.0}
    drafting, probe = arms.choose(key)
    arms.observe(key, drafting, probe, tokens=2, seconds=1.0)  # plain: 2 tok/s
    assert drafting is False
    run = []
    for _ in range(20):
        drafting, probe = arms.choose(key)
        arms.observe(key, drafting, probe, tokens=5 if drafting else 2, seconds=1.0)  # warm: 5 tok/s
        run.append(drafting)
    # a probe of drafting is warmup_steps + 2 steps; its warm steps show drafting wins
    assert run[run.index(True) : run.index(True) + 4] == [True] * 4
    assert arms.choose(key)[0] is True


def _step(policy, rows, tokens_per_row: int, seconds: float, drafter_s: float = 0.0,
          stall_s: float | None = None, stopped_drafter_s: float = 0.0, catching_up: bool = False) -> list[int]:  # fmt: skip
    plans = policy.plan(rows)
    if catching_up:  # every drafter still catching up: the loop fed no draft
        outcomes = [RowOutcome(0, 0) for _ in plans]
        cost = StepCost(len(rows), len(rows), seconds, drafter_s, stall_s=stall_s,
                        num_catching_up=sum(p.k > 0 for p in plans))  # fmt: skip
    else:
        outcomes = [RowOutcome(p.k, tokens_per_row - 1 if p.k else 0) for p in plans]
        cost = StepCost(len(rows), sum(p.k + 1 for p in plans), seconds, drafter_s, stopped_drafter_s, stall_s=stall_s)
    policy.observe(rows, outcomes, cost)
    return [p.k for p in plans]


def test_a_probe_waits_for_drafters_that_catch_up_and_measures_them_warm():
    """Steps whose drafters were all still catching up on the context ran plain: they
    measure nothing, and the probe of drafting they belonged to keeps its full length."""
    policy = RulePolicy(LOAD_AWARE)
    policy.arms = LoadArms(warmup_steps=1, min_probe_gap=2, max_probe_gap=2, probe_share=1.0)
    rows = [policy.start(GenerationRequest(prompt_ids=[1], method="sorted"))]
    key = (1, "sorted", True)
    assert _step(policy, rows, 1, 0.01, catching_up=True) == [4]  # the first try: its drafter catches up
    assert _step(policy, rows, 1, 0.01, catching_up=True) == [4]
    assert policy.arms.arms[key].num_measured == {}  # nothing measured yet
    assert _step(policy, rows, 2, 0.02) == [4]  # warm-up (drafting_run 1), unmeasured
    assert _step(policy, rows, 2, 0.04) == [4]  # measured: 50 tok/s
    assert policy.arms.arms[key].goodput == {True: 50.0}
    assert _step(policy, rows, 1, 0.01) == [0]  # plain measured: 100 tok/s, the better arm
    assert _step(policy, rows, 1, 0.01) == [0]
    ks = [_step(policy, rows, 1, 0.01, catching_up=True)[0] for _ in range(3)]  # a probe catches up ...
    assert ks == [4, 4, 4]
    ks = [_step(policy, rows, 2, 0.04)[0] for _ in range(4)]  # ... then runs warmup_steps + 2 steps
    assert ks == [4, 4, 4, 0]
    # the try's one measured step and the probe's two; catch-up steps measured nothing
    assert policy.arms.arms[key].num_measured == {True: 3, False: 3}


@pytest.mark.parametrize("charge", [True, False])
def test_drafter_compute_is_charged_to_drafting_steps_where_the_pool_shares_the_machine(charge):
    """Drafting wins the loop's own cycle (2 tokens per row in 0.03 s against 1 in 0.02 s)
    but the pool spent 0.02 s of CPU on it: charged, plain steps win."""
    policy = RulePolicy(LOAD_AWARE.model_copy(update={"charge_drafter_compute": charge}))
    policy.arms = LoadArms(warmup_steps=0)
    rows = [policy.start(GenerationRequest(prompt_ids=[1], method="ngram")) for _ in range(8)]
    assert _step(policy, rows, tokens_per_row=2, seconds=0.03, drafter_s=0.02)[0] == 5  # measures drafting
    assert _step(policy, rows, tokens_per_row=1, seconds=0.02)[0] == 0  # measures plain
    # charged: drafting 16 tokens / 0.05 s = 320 tok/s < plain 400; free: 533 > 400
    assert _step(policy, rows, tokens_per_row=1, seconds=0.02)[0] == (0 if charge else 5)


@pytest.mark.parametrize(("stall_s", "drafting_wins"), [(0.0, True), (0.005, True), (0.02, False), (None, False)])
def test_drafter_compute_is_charged_only_as_far_as_the_machine_ran_short_of_cpu(stall_s, drafting_wins):
    """The pool's 0.02 s of CPU cost nobody anything where no task waited for a CPU during
    the step; charged up to the stall time (all of it where the kernel reports none)."""
    policy = RulePolicy(LOAD_AWARE)
    policy.arms = LoadArms(warmup_steps=0)
    rows = [policy.start(GenerationRequest(prompt_ids=[1], method="ngram")) for _ in range(8)]
    _step(policy, rows, tokens_per_row=2, seconds=0.03, drafter_s=0.02, stall_s=stall_s)  # drafting
    _step(policy, rows, tokens_per_row=1, seconds=0.02, stall_s=0.0)  # plain: 400 tok/s
    # drafting: 16 tokens over 0.03 s + the charge (0 / 0.005 / 0.02 / 0.02)
    assert _step(policy, rows, tokens_per_row=1, seconds=0.02)[0] == (5 if drafting_wins else 0)


def test_a_stopped_run_aheads_compute_is_charged_to_the_next_drafting_step_not_the_plain_one():
    """A plain step that stops `card`'s run-ahead is told what it had spent drafting before:
    that is drafting's cost, so the plain step's pace stays its own."""
    policy = RulePolicy(LOAD_AWARE)
    policy.arms = LoadArms(warmup_steps=0, min_probe_gap=10**6, drafting_margin=0.0)
    rows = [policy.start(GenerationRequest(prompt_ids=[1], method="ngram")) for _ in range(8)]
    arms = lambda: policy.arms.arms[(8, "ngram", True)].goodput  # noqa: E731
    assert _step(policy, rows, tokens_per_row=2, seconds=0.04)[0] == 5  # drafting: 400 tok/s
    assert _step(policy, rows, tokens_per_row=1, seconds=0.02, stopped_drafter_s=0.04)[0] == 0
    assert arms() == pytest.approx({True: 400.0, False: 400.0})  # plain: 8 tokens / 0.02 s, no charge
    policy.arms.arms[(8, "ngram", True)].drafting_best = True  # (the arms are tied: drafting runs)
    assert _step(policy, rows, tokens_per_row=2, seconds=0.04)[0] == 5  # charged the 0.04 s owed
    assert arms()[True] == pytest.approx(16 / ((0.04 + 0.08) / 2))  # 16 tokens in 0.04 s, then in 0.04 + 0.04 s
    assert policy._owed_drafter_s == 0.0


def test_a_full_batch_stops_drafting_where_plain_steps_give_more():
    policy = RulePolicy(LOAD_AWARE)
    policy.arms = LoadArms(warmup_steps=0)
    rows = [policy.start(GenerationRequest(prompt_ids=[1], method="ngram")) for _ in range(8)]
    pinned = policy.start(GenerationRequest(prompt_ids=[1], method="ngram", num_speculative_tokens=2))
    batch = [*rows, pinned]
    assert _step(policy, batch, tokens_per_row=2, seconds=0.05)[0] == 5  # measures drafting: 360 tok/s
    assert _step(policy, batch, tokens_per_row=1, seconds=0.02) == [0] * 8 + [2]  # plain: 450 tok/s; pinned stays
    ks = [_step(policy, batch, tokens_per_row=1, seconds=0.02)[0] for _ in range(100)]
    # plain, probing drafting (runs of 2 steps) at most every min_probe_gap steps
    assert 1 <= ks.count(5) <= 2 * (len(ks) // LoadArms().min_probe_gap + 1) and ks.count(0) == len(ks) - ks.count(5)
    assert policy.summary(rows[0])["goodput.8_rows.plain"] == pytest.approx(450, rel=0.01)


def test_a_single_stream_and_each_method_and_mode_have_their_own_arms():
    policy = RulePolicy(LOAD_AWARE)
    policy.arms = LoadArms(warmup_steps=0)
    alone = [policy.start(GenerationRequest(prompt_ids=[1], method="sorted", sampling=SamplingParams(temperature=0.8)))]
    _step(policy, alone, tokens_per_row=2, seconds=0.03)  # drafting: 67 tok/s
    _step(policy, alone, tokens_per_row=1, seconds=0.01)  # plain: 100 tok/s
    assert _step(policy, alone, tokens_per_row=1, seconds=0.01) == [0]  # a losing drafter stops even alone
    greedy = [policy.start(GenerationRequest(prompt_ids=[1], method="sorted"))]
    # a greedy single stream has arms of its own: it tries drafting, although the sampled one lost
    assert _step(policy, greedy, tokens_per_row=3, seconds=0.01) == [greedy[0].k]  # drafting: 300 tok/s
    _step(policy, greedy, tokens_per_row=1, seconds=0.01)  # plain: 100 tok/s
    assert _step(policy, greedy, tokens_per_row=3, seconds=0.01) == [greedy[0].k]
    pair = [policy.start(GenerationRequest(prompt_ids=[1], method="sorted")) for _ in range(2)]
    _step(policy, pair, tokens_per_row=2, seconds=0.05)  # drafting: 80 tok/s
    _step(policy, pair, tokens_per_row=1, seconds=0.01)  # plain: 200 tok/s
    assert _step(policy, pair, tokens_per_row=1, seconds=0.01) == [0, 0]  # from two greedy rows on, the arms decide
    fast = [policy.start(GenerationRequest(prompt_ids=[1], method="ngram")) for _ in range(8)]
    _step(policy, fast, tokens_per_row=4, seconds=0.05)  # drafting: 640 tok/s
    _step(policy, fast, tokens_per_row=1, seconds=0.02)  # plain: 400 tok/s
    slow = [policy.start(GenerationRequest(prompt_ids=[1], method="sorted")) for _ in range(8)]
    _step(policy, slow, tokens_per_row=2, seconds=0.08)  # drafting: 200 tok/s
    _step(policy, slow, tokens_per_row=1, seconds=0.02)  # plain: 400 tok/s
    assert _step(policy, slow, tokens_per_row=1, seconds=0.02) == [0] * 8
    assert _step(policy, fast, tokens_per_row=4, seconds=0.05) == [5] * 8


def test_a_single_row_right_after_a_batch_runs_plain_unmeasured():
    policy = RulePolicy(LOAD_AWARE)
    policy.arms = LoadArms(warmup_steps=0)
    pair = [policy.start(GenerationRequest(prompt_ids=[1], method="ngram")) for _ in range(2)]
    assert _step(policy, pair, tokens_per_row=1, seconds=0.01) == [5, 5]
    # one request of the two ended, the next is not decoding yet: a dip, not a single stream
    ks = [_step(policy, pair[:1], tokens_per_row=1, seconds=0.01)[0] for _ in range(RulePolicy.DIP_STEPS)]
    assert ks == [0] * RulePolicy.DIP_STEPS
    assert set(policy.arms.arms) == {(2, "ngram", True)}  # the dip measured nothing
    # then it is a single stream: its own arms, drafting tried first
    assert _step(policy, pair[:1], tokens_per_row=1, seconds=0.01) == [pair[0].k]
    assert policy.arms.arms[(1, "ngram", True)].num_measured == {True: 1}
    # a single stream's next request: a step that only prefills it, then its first decoding
    # step, which is no dip (no step of several rows came between)
    assert policy.plan([]) == []
    assert _step(policy, pair[:1], tokens_per_row=1, seconds=0.01) == [0]  # the arms' own choice: plain measured next
    assert policy.arms.arms[(1, "ngram", True)].num_measured == {True: 1, False: 1}


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


def test_seeded_arms_skip_their_first_measurement_and_yield_to_local_ones():
    arms = LoadArms(min_probe_gap=2, warmup_steps=2)
    key = (8, "card", True)
    assert arms.seed(key, {True: 100.0, False: 400.0}) == 2  # another replica: drafting loses
    assert arms.choose(key) == (False, False)  # plain at once: no warm-up, no measured drafting step
    assert arms.arms[key].num_measured == {}  # seeded: no step measured here
    arms.observe(key, False, False, tokens=8, seconds=0.04)  # 200 tok/s here: replaces the seed
    assert arms.arms[key].goodput[False] == 200.0 and arms.arms[key].num_measured == {False: 1}
    # probes go on: drafting is tried again, and its first measured step replaces its seed
    probed = []
    for _ in range(8):
        drafting, probe = arms.choose(key)
        arms.observe(key, drafting, probe, tokens=40 if drafting else 8, seconds=0.04)  # drafting: 1000 tok/s
        probed.append(drafting)
    assert True in probed and arms.arms[key].num_measured[True] >= 1
    assert arms.arms[key].goodput[True] == 1000.0
    assert arms.choose(key)[0] is True  # this machine drafts faster: noticed
    # a seed never overwrites a local measurement
    assert arms.seed(key, {True: 1.0, False: 1.0}) == 0 and arms.arms[key].goodput[True] == 1000.0


def test_measured_steps_are_summed_for_the_store_and_warm_up_steps_are_not():
    arms = LoadArms(warmup_steps=1)
    key = (4, "ngram", False)
    for drafting, tokens in ((True, 3), (True, 5), (True, 7), (False, 4)):
        arms.choose(key)
        arms.observe(key, drafting, False, tokens=tokens, seconds=0.5)
    taken = arms.take_unpublished()
    assert {k: (t.tokens, t.seconds, t.steps) for k, t in taken.items()} == {
        (key, True): (12.0, 1.0, 2),  # the first drafting step warmed up
        (key, False): (4.0, 0.5, 1),
    }
    assert arms.take_unpublished() == {}


def test_after_observe_is_called_after_each_measured_step():
    policy = RulePolicy(LOAD_AWARE)
    calls = []
    policy.after_observe = lambda: calls.append(len(policy.arms.unpublished))
    rows = [policy.start(GenerationRequest(prompt_ids=[1], method="ngram")) for _ in range(4)]
    for _ in range(3):
        _step(policy, rows, tokens_per_row=2, seconds=0.01)
    assert len(calls) == 3


def test_goodput_is_averaged_tokens_over_averaged_seconds():
    arms = LoadArms(alpha=0.5, warmup_steps=0)
    key = (4, "sorted", True)
    arms.choose(key)
    # a short lucky step and a long one: 10 tokens in 0.01 s, then 4 in 0.05 s
    arms.observe(key, True, False, tokens=10, seconds=0.01)
    arms.observe(key, True, False, tokens=4, seconds=0.05)
    # (7 tokens / 0.03 s), not the mean of 1000 and 80 tok/s, which the lucky step dominates
    assert arms.arms[key].goodput[True] == pytest.approx(7 / 0.03)


def test_an_arms_first_steps_are_averaged_equally_then_exponentially():
    arms = LoadArms(alpha=0.25, warmup_steps=0)
    key = (4, "sorted", True)
    arms.choose(key)
    for tokens, seconds in [(8, 0.02), (4, 0.04), (6, 0.03), (5, 0.01)]:  # the first 1 / alpha steps
        arms.observe(key, True, False, tokens=tokens, seconds=seconds)
    assert arms.arms[key].goodput[True] == pytest.approx(23 / 0.10)  # a plain mean, not the first step's
    arms.observe(key, True, False, tokens=13, seconds=0.01)  # then each new step weighs alpha
    assert arms.arms[key].goodput[True] == pytest.approx((0.75 * 23 / 4 + 0.25 * 13) / (0.75 * 0.10 / 4 + 0.25 * 0.01))


def test_the_running_arm_stays_unless_the_other_is_ahead_by_the_margin():
    arms = LoadArms(alpha=1.0, warmup_steps=0, switch_margin=0.05, min_probe_gap=10**6, drafting_margin=0.0)
    key = (4, "draft_model", False)

    def measure(on: float, off: float) -> bool:
        arms.observe(key, True, False, tokens=on, seconds=1.0)
        arms.observe(key, False, False, tokens=off, seconds=1.0)
        return arms.choose(key)[0]

    arms.choose(key)
    assert measure(on=100, off=98) is True  # drafting ahead: it runs
    assert measure(on=100, off=104) is True  # plain 4 % ahead: within the margin, no flip
    assert measure(on=100, off=106) is False  # 6 % ahead: plain runs
    assert measure(on=104, off=100) is False  # and stays until drafting leads by the margin
    assert measure(on=106, off=100) is True


def test_drafting_runs_only_where_it_leads_plain_by_the_drafting_margin():
    """The loop's cycle misses part of what drafting costs on a shared machine: `sorted` on
    target-m led plain by 3 % in the loop at 8 rows and ended at 0.80x `none`."""
    arms = LoadArms(alpha=1.0, warmup_steps=0, min_probe_gap=10**6, drafting_margin=0.1)
    key = (8, "sorted", True)
    arms.choose(key)
    arms.observe(key, True, False, tokens=610, seconds=1.0)
    arms.observe(key, False, False, tokens=593, seconds=1.0)
    assert arms.choose(key) == (False, False)  # 3 % ahead: plain
    arms.observe(key, True, False, tokens=700, seconds=1.0)  # 18 % ahead: drafting
    assert arms.choose(key) == (True, False)
