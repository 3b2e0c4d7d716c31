"""`verifier_service.policy_stats` on a `MemoryStore` (the Redis ones are in
tests/integration/test_policy_stats.py): keys, counters written and merged across replicas,
foreign values ignored and counted, seeding a policy, a store that does not answer."""

from __future__ import annotations

import math
import time

import pytest

from shared import metrics
from shared.config import MethodSpeculation, default_config
from shared.store import MemoryStore, RedisStore, StoreRunner
from verifier_service.policy import RulePolicy, Tally
from verifier_service.policy_stats import (
    MAX_MEMBERS,
    PolicyStats,
    goodputs,
    member,
    parse,
    read,
    store_keys,
    updates,
)

CONFIG = default_config()
TARGET = "codelm-target-s"
KEYS = store_keys(CONFIG, TARGET)


@pytest.fixture
def runner():
    runner = StoreRunner(MemoryStore())
    yield runner
    runner.close()


def bad_values(store: str = "memory") -> float:
    return metrics.STORE_BAD_VALUES.labels(store)._value.get()


def test_keys_name_target_drafter_and_variant():
    drafters = {d.kind: d.name for d in CONFIG.drafters}
    assert KEYS[("ngram", True)] == f"specdec:stats:{TARGET}:ngram:ngram.greedy.fixed.k5"
    assert KEYS[("ngram", False)] == f"specdec:stats:{TARGET}:ngram:ngram.sampled.plus2minus1.k5"
    assert KEYS[("draft_model", False)] == f"specdec:stats:{TARGET}:{drafters['draft_model']}:draft_model.sampled.fixed.k2"
    assert KEYS[("card", True)].startswith(f"specdec:stats:{TARGET}:{CONFIG.drafters[0].name}:card.greedy.")
    if "sorted" in drafters:
        assert KEYS[("sorted", True)].endswith(":sorted.greedy.plus2minus1.k5.fixed_exit=1")
    # other settings, other counters: a pace measured at k = 5 says little about k = 9
    speculation = CONFIG.speculation.model_copy(
        update={"methods": {**CONFIG.speculation.methods, "ngram": MethodSpeculation(num_speculative_tokens=9)}}
    )
    changed = store_keys(CONFIG.model_copy(update={"speculation": speculation}), TARGET)
    assert changed[("ngram", True)] != KEYS[("ngram", True)]
    assert changed[("card", True)] == KEYS[("card", True)]


def test_counters_of_two_replicas_merge_into_one_pace(runner):
    a = {((8, "ngram", True), True): Tally(300.0, 1.0, 10), ((8, "ngram", True), False): Tally(80.0, 0.2, 10)}
    b = {((8, "ngram", True), True): Tally(100.0, 1.0, 10), ((1, "ngram", True), True): Tally(0.0, 0.0, 0)}
    for tallies in (a, b):
        runner.submit(runner.store.incr_counts, updates(KEYS, tallies), MAX_MEMBERS, 60).result(5)
    paces = runner.submit(read, runner, KEYS).result(5)
    assert paces == {(8, "ngram", True): {True: 200.0, False: 400.0}}  # nothing measured at 1 row: nothing written


def test_foreign_members_and_implausible_counters_are_ignored_and_counted():
    good = [(member(4, True, "t"), 30.0), (member(4, True, "s"), 1.0), (member(4, True, "n"), 5.0)]
    garbage = [(b"\xff\xfe", 1.0), (b"4:1", 1.0), (b"3:1:t", 1.0), (b"4:2:t", 1.0), (b"4:1:x", 1.0),
               (member(8, False, "t"), math.nan), (member(8, False, "s"), -1.0), (b"a:b:c", 1.0)]  # fmt: skip
    tallies, bad = parse(good + garbage)
    assert bad == len(garbage)
    assert goodputs(tallies) == ({4: {True: 30.0}}, 0)
    # a pace no machine has, or steps that emitted no token: not a measurement
    tallies, _ = parse([(member(2, True, "t"), 1e12), (member(2, True, "s"), 1.0), (member(2, True, "n"), 5.0),
                        (member(2, False, "t"), 1.0), (member(2, False, "s"), 1.0), (member(2, False, "n"), 5.0)])  # fmt: skip
    assert goodputs(tallies) == ({}, 2)
    # more members than we ever write
    assert parse([(b"x%d" % i, 1.0) for i in range(MAX_MEMBERS + 1)]) == ({}, 1)


def test_garbage_under_a_key_reads_as_nothing_and_is_counted(runner):
    key = KEYS[("ngram", True)]
    junk = [(key, b"junk-%d" % i, 5.0) for i in range(3)]
    junk += [(key, member(8, True, "t"), 1e12), (key, member(8, True, "s"), 1.0), (key, member(8, True, "n"), 5.0)]
    runner.submit(runner.store.incr_counts, junk, 1000, 60).result(5)
    before = bad_values()
    assert runner.submit(read, runner, KEYS).result(5) == {}
    assert bad_values() == before + 4


def test_a_replica_publishes_in_the_background_and_the_next_one_starts_warm(runner):
    a = RulePolicy(CONFIG.speculation_for(TARGET))
    stats_a = PolicyStats.attach(runner, CONFIG, TARGET, a, publish_every_s=0.0)
    assert stats_a is not None and stats_a.num_seeded == 0 and a.after_observe == stats_a.after_step
    key = (4, "ngram", True)
    for drafting, tokens in [(True, 20)] * 5 + [(False, 4)] * 3:  # warm-up steps included
        a.arms.choose(key)
        a.arms.observe(key, drafting, False, tokens=tokens, seconds=0.1)
        a.after_observe()  # what RulePolicy.observe calls on the step thread
    stats_a.close()
    assert a.after_observe is None
    b = RulePolicy(CONFIG.speculation_for(TARGET))
    stats_b = PolicyStats.attach(runner, CONFIG, TARGET, b)
    assert stats_b.num_seeded == 2
    assert b.arms.arms[key].goodput == pytest.approx({True: 200.0, False: 40.0})
    assert b.arms.arms[key].num_measured == {}  # seeded: no step measured here
    assert b.arms.choose(key) == (True, False)  # the better arm at once, nothing measured first


def test_no_arms_no_statistics(runner):
    fixed = RulePolicy(CONFIG.speculation.model_copy(update={"load_aware": False}))
    assert PolicyStats.attach(runner, CONFIG, TARGET, fixed) is None
    assert PolicyStats.attach(runner, CONFIG, TARGET, object()) is None


def test_a_store_that_does_not_answer_means_a_cold_start_within_the_wait():
    from router.serve import free_port

    runner = StoreRunner(RedisStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.2))
    try:
        failed = metrics.POLICY_STATS.labels(TARGET, "read_failed")
        before = failed._value.get()
        policy = RulePolicy(CONFIG.speculation_for(TARGET))
        t0 = time.monotonic()
        stats = PolicyStats.attach(runner, CONFIG, TARGET, policy, wait_s=0.5)
        assert time.monotonic() - t0 < 1.5
        assert stats is not None and stats.num_seeded == 0 and policy.arms.arms == {}
        assert failed._value.get() == before + 1
        key = (4, "ngram", True)
        policy.arms.choose(key)
        policy.arms.observe(key, False, False, tokens=4, seconds=0.1)
        written = metrics.POLICY_STATS.labels(TARGET, "write_failed")
        before = written._value.get()
        stats.close(timeout_s=2.0)  # a failed last write is counted, never raised
        assert written._value.get() == before + 1
    finally:
        runner.close()
