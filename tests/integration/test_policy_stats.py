"""The verifier policy's statistics on a real Redis (`verifier_service.policy_stats`): replica
A (a real `VerifierServicer`) serves a full batch and publishes its measured arms; replica B,
started afterwards on the same Redis, starts with them seeded and skips the cold start's
measuring steps, its output still HF greedy. Counters of two store connections merge, and
garbage under a stats key (a foreign type, foreign members) is ignored and counted."""

from __future__ import annotations

import threading

import pytest

from shared import metrics
from shared.config import default_config
from shared.loading import tokenizer_hash
from shared.store import RedisStore, StoreRunner
from shared.types import GenerationRequest, GenerationResult
from tests.exactness import compare_greedy, humaneval_prompts
from tests.redis_server import RedisServer
from verifier_service.engine import load_target
from verifier_service.loop import SpecDecodeLoop
from verifier_service.policy import LoadArms, RulePolicy, Tally
from verifier_service.policy_stats import (
    MAX_MEMBERS,
    PolicyStats,
    member,
    read,
    store_keys,
    updates,
)
from verifier_service.servicer import VerifierServicer

TARGET = "codelm-target-s"
ROWS = 4  # requests decoding together: the arms' batch size under test
MAX_NEW = 24
KEY = (ROWS, "ngram", True)


class RecordingArms(LoadArms):
    """LoadArms that keep each choice at the full batch (test only)."""

    def __init__(self) -> None:
        super().__init__()
        self.choices: list[tuple[bool, bool]] = []

    def choose(self, key, measurable=True):
        choice = super().choose(key, measurable)
        if key == KEY:
            self.choices.append(choice)
        return choice


def _config(redis_url: str):
    base = default_config()
    store = base.store.model_copy(update={
        "redis_url": redis_url,
        # off: both replicas draft from their own context only, so their paces compare
        "shared_ngram": base.store.shared_ngram.model_copy(update={"enabled": False}),
    })  # fmt: skip
    return base.model_copy(update={"store": store})


def _serve(servicer: VerifierServicer, prompts: list[list[int]]) -> list[GenerationResult]:
    """Submit every prompt at once (one full batch) through the replica's scheduler."""
    results: dict[int, object] = {}
    done = threading.Semaphore(0)

    def sink(i: int):
        def put(item: object) -> None:
            if isinstance(item, (GenerationResult, BaseException)):
                results[i] = item
                done.release()

        return put

    for i, prompt in enumerate(prompts):
        request = GenerationRequest(prompt_ids=prompt, max_new_tokens=MAX_NEW, method="ngram")
        servicer.scheduler.submit(request, servicer.proposer_factory("ngram"), sink(i))
    for _ in prompts:
        assert done.acquire(timeout=300), "a request did not finish"
    for item in results.values():
        if isinstance(item, BaseException):
            raise item
    return [results[i] for i in range(len(prompts))]


def _replica(config, engine, tokenizer) -> tuple[VerifierServicer, RecordingArms]:
    servicer = VerifierServicer(config, TARGET)
    policy = RulePolicy(config.speculation_for(TARGET))
    policy.arms = arms = RecordingArms()
    servicer.attach(SpecDecodeLoop(engine.resized(ROWS), tokenizer, policy), tokenizer_hash(config.target(TARGET).model_dir))
    return servicer, arms


@pytest.mark.slow
def test_replica_b_starts_with_the_arms_replica_a_measured(tmp_path):
    redis = RedisServer(tmp_path)
    config = _config(redis.url)
    engine, tokenizer = load_target(config.target(TARGET), max_batch_rows=ROWS)
    prompts = [tokenizer(p).input_ids for p in humaneval_prompts(ROWS, offset=20)]
    written = metrics.POLICY_STATS.labels(TARGET, "written")
    seeded = metrics.POLICY_STATS.labels(TARGET, "seeded")
    a, arms_a = _replica(config, engine, tokenizer)
    try:
        assert a.policy_stats is not None and a.policy_stats.num_seeded == 0  # an empty Redis: cold
        for prompt, result in zip(prompts, _serve(a, prompts), strict=True):
            assert compare_greedy(TARGET, prompt, result.token_ids, MAX_NEW).ok
        before = written._value.get()
    finally:
        a.close()  # writes what it measured since its last write
    assert written._value.get() >= before + 1  # (a periodic write may still have been in flight)
    measured = {drafting for drafting in (True, False) if drafting in arms_a.arms[KEY].goodput}
    assert measured, "replica A measured nothing at a full batch"

    seeded_before = seeded._value.get()
    b, arms_b = _replica(config, engine, tokenizer)
    try:
        assert b.policy_stats.num_seeded >= 1
        assert seeded._value.get() == seeded_before + b.policy_stats.num_seeded
        assert arms_b.arms[KEY].goodput and arms_b.arms[KEY].num_measured == {}  # seeded, nothing measured yet
        seeds = dict(arms_b.arms[KEY].goodput)
        for prompt, result in zip(prompts, _serve(b, prompts), strict=True):
            assert compare_greedy(TARGET, prompt, result.token_ids, MAX_NEW).ok
    finally:
        b.close()
        redis.stop()
    # the cold replica's first choices measure: drafting until warm and measured, then plain
    measuring = LoadArms().warmup_steps + 1
    print(f"\nreplica A (cold): {arms_a.choices}\nreplica B (seeded {seeds}): {arms_b.choices}")
    assert arms_a.choices[: measuring + 1] == [(True, False)] * measuring + [(False, False)]
    if len(seeds) == 2:  # both arms seeded: the better one from the first step, nothing measured first
        assert arms_b.choices[0] == (seeds[True] >= seeds[False], False)
    else:  # one seeded: only the other is measured
        assert arms_b.choices[0] == (True not in seeds, False)


def test_counters_merge_across_connections_and_garbage_is_ignored_and_counted(tmp_path):
    redis = RedisServer(tmp_path)
    config = _config(redis.url)
    keys = store_keys(config, TARGET)
    runners = [StoreRunner(RedisStore(redis.url, socket_timeout_s=0.5)) for _ in range(2)]
    try:
        for runner, on in zip(runners, (300.0, 100.0), strict=True):
            tallies = {(KEY, True): Tally(on, 1.0, 5), (KEY, False): Tally(50.0, 0.25, 5)}
            runner.submit(runner.store.incr_counts, updates(keys, tallies), MAX_MEMBERS, 60).result(5)
        assert runners[0].submit(read, runners[0], keys).result(5) == {KEY: {True: 200.0, False: 200.0}}
        client = runners[0].store.client
        ttl = runners[0].submit(client.ttl, keys[("ngram", True)]).result(5)
        assert 0 < ttl <= 60

        # a foreign type under one key, foreign members and an implausible pace under another
        bad = metrics.STORE_BAD_VALUES.labels("redis")
        before = bad._value.get()
        runners[0].submit(client.set, keys[("ngram", True)], b"not ours").result(5)
        junk = [(keys[("ngram", False)], b"junk", 1.0), (keys[("ngram", False)], member(2, True, "t"), 1e12),
                (keys[("ngram", False)], member(2, True, "s"), 1.0), (keys[("ngram", False)], member(2, True, "n"), 9.0)]  # fmt: skip
        runners[0].submit(runners[0].store.incr_counts, junk, MAX_MEMBERS, 60).result(5)
        policy = RulePolicy(config.speculation_for(TARGET))
        stats = PolicyStats.attach(runners[1], config, TARGET, policy)
        assert stats.num_seeded == 0 and all(not arms.goodput for arms in policy.arms.arms.values())
        assert bad._value.get() == before + 3  # WRONGTYPE, the foreign member, the implausible arm
    finally:
        for runner in runners:
            runner.close()
        redis.stop()
