"""The store (`shared.store`) on a real `redis-server` and in memory: the same contract for
both (counted members, top-N trim, TTL), garbage under our keys ignored and counted, a
wrong password a clear error, Redis down = fast failures (circuit breaker), then recovery
when it returns; and the shared n-gram table's keys, packing and non-blocking reads."""

from __future__ import annotations

import time

import numpy as np
import pytest

from shared import metrics
from shared.config import NgramConfig, SharedNgramConfig
from shared.ngram_table import SharedDrafts, SharedNgramTable, ngram_key, pack
from shared.store import (
    RedisStore,
    StoreAuthError,
    StoreRunner,
    StoreUnavailable,
)
from shared.types import SamplingParams
from tests.redis_server import RedisServer


def _run(runner, fn, *args):
    return runner.submit(fn, *args).result(5)


def test_counts_top_and_trim(runner):
    key = f"specdec:test:{time.monotonic_ns()}"
    updates = [(key, b"a", 1.0), (key, b"b", 1.0), (key, b"b", 1.0), (key, b"c", 3.0), (key, b"d", 0.5)]
    _run(runner, runner.store.incr_counts, updates, 3, 60)
    (top,) = _run(runner, runner.store.top, [key], 10)
    assert top == [(b"c", 3.0), (b"b", 2.0), (b"a", 1.0)]  # "d" trimmed: top 3 kept
    assert _run(runner, runner.store.top, [key, key + ":missing"], 1) == [[(b"c", 3.0)], []]


def test_redis_keys_get_a_ttl_and_foreign_values_are_ignored(redis_server):
    import redis

    runner = StoreRunner(RedisStore(redis_server.url))
    raw = redis.Redis.from_url(redis_server.url)
    try:
        _run(runner, runner.store.incr_counts, [("specdec:test:ttl", b"x", 1.0)], 4, 60)
        assert 0 < raw.ttl("specdec:test:ttl") <= 60
        raw.set("specdec:test:string", b"garbage")  # not a sorted set: WRONGTYPE on read
        before = metrics.STORE_BAD_VALUES.labels("redis")._value.get()
        assert _run(runner, runner.store.top, ["specdec:test:string", "specdec:test:ttl"], 1) == [[], [(b"x", 1.0)]]
        assert metrics.STORE_BAD_VALUES.labels("redis")._value.get() == before + 1
    finally:
        runner.close()
        raw.close()


def test_wrong_password_is_a_clear_error(tmp_path):
    server = RedisServer(tmp_path, password="right")
    try:
        runner = StoreRunner(RedisStore(server.url, password="wrong"))
        with pytest.raises(StoreAuthError, match="refused the credentials"):
            runner.check()
        runner.close()
        ok = StoreRunner(RedisStore(server.url, password="right"))
        assert ok.check()
        ok.close()
    finally:
        server.stop()


def test_down_fails_fast_then_recovers(tmp_path):
    server = RedisServer(tmp_path)
    store = RedisStore(server.url, socket_timeout_s=0.2, breaker_failures=2, breaker_cooldown_s=0.5)
    runner = StoreRunner(store)
    try:
        assert runner.check()
        server.stop()
        for _ in range(2):
            with pytest.raises(StoreUnavailable):
                _run(runner, store.ping)
        assert store.breaker.is_open
        t = time.monotonic()
        with pytest.raises(StoreUnavailable, match="breaker is open"):
            _run(runner, store.ping)
        assert time.monotonic() - t < 0.1  # no connection attempt while open
        assert metrics.STORE_UP.labels("redis")._value.get() == 0
        server.start()  # same port
        time.sleep(0.6)  # the cooldown: the next call probes
        deadline = time.monotonic() + 5
        while True:
            try:
                _run(runner, store.ping)
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "no reconnect after Redis returned"
                time.sleep(0.2)
        assert not store.breaker.is_open and metrics.STORE_UP.labels("redis")._value.get() == 1
    finally:
        runner.close()
        server.stop()


# ---------------------------------------------------------------- the n-gram table


CONFIG = SharedNgramConfig(min_n=2, max_n=3, continuation_len=4)


def test_learned_continuations_are_read_back_and_garbage_is_skipped(runner):
    table = SharedNgramTable(runner, CONFIG, "tokhash", f"t{time.monotonic_ns()}", vocab_size=100)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    _run(runner, table._write, tokens)
    assert table.fetch([7, 1, 2]).result(5) == [[3, 4, 5, 6]]  # after the 2-token context [1, 2]
    assert table.fetch([0, 2, 3]).result(5) == [[4, 5, 6, 7]]  # [0, 2, 3]: no 3-gram, the 2-gram [2, 3]
    assert table.fetch([9, 9]).result(5) == []
    # foreign members above the learned one under the 3-gram key [1, 2, 3]: one of the wrong
    # size, one with an out-of-vocabulary id; both skipped and counted, the 2-gram answers
    assert table.fetch([1, 2, 3]).result(5) == [[4, 5, 6, 7]]
    key = ngram_key("tokhash", table.target, [1, 2, 3])
    _run(runner, runner.store.incr_counts, [(key, b"junk", 9.0), (key, pack([1, 2, 3, 500]), 8.0)], 4, 60)
    bad = metrics.STORE_BAD_VALUES.labels(runner.store.name)
    before = bad._value.get()
    fresh = SharedNgramTable(runner, CONFIG, "tokhash", table.target, vocab_size=100)  # nothing recent
    assert fresh.fetch([1, 2, 3]).result(5) == [[4, 5, 6, 7]]
    assert bad._value.get() == before + 2


def test_shared_drafts_never_wait_and_align_with_emitted_tokens(runner):
    table = SharedNgramTable(runner, CONFIG, "tokhash", f"t{time.monotonic_ns()}", vocab_size=100)
    _run(runner, table._write, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    drafts = SharedDrafts(table)
    assert drafts.draft([0, 1, 2], 3) == []  # nothing fetched yet: issues the fetch, returns at once
    drafts._fetch[1].result(5)  # (test only) let it arrive
    # the round emitted [3] since: the continuation [3, 4, 5, 6] still aligns -> [4, 5, 6]
    assert drafts.draft([0, 1, 2, 3], 3) == [4, 5, 6]
    drafts.update(2)
    assert drafts._fetch is not None
    drafts._fetch[1].result(5)
    assert drafts.draft([0, 1, 2, 3, 9], 3) == []  # emitted 9: the fetched [4, ...] is stale
    assert drafts.num_hits == 1 and drafts.num_stale == 1


def test_a_runner_up_continuation_drafts_where_the_best_one_went_stale(runner):
    table = SharedNgramTable(runner, CONFIG, "tokhash", f"t{time.monotonic_ns()}", vocab_size=100)
    for _ in range(2):  # after [1, 2]: [3, 4, 5, 6] twice, [3, 7, 8, 9] once
        _run(runner, table._write, [1, 2, 3, 4, 5, 6])
    _run(runner, table._write, [1, 2, 3, 7, 8, 9])
    assert table.fetch([0, 1, 2]).result(5)[:2] == [[3, 4, 5, 6], [3, 7, 8, 9]]
    drafts = SharedDrafts(table)
    drafts.draft([0, 1, 2], 3)
    drafts._fetch[1].result(5)
    # the round emitted [3, 7]: the best continuation went stale, the runner-up goes on
    assert drafts.draft([0, 1, 2, 3, 7], 3) == [8, 9]
    assert drafts.num_hits == 1 and drafts.num_stale == 0


def test_a_weak_own_match_gives_way_to_the_table_and_a_strong_one_does_not(runner):
    table = SharedNgramTable(runner, CONFIG, "tokhash", f"t{time.monotonic_ns()}", vocab_size=100)
    _run(runner, table._write, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert CONFIG.own_match_min == 3
    for own_n, expected in ((0, [3, 4, 5]), (2, [3, 4, 5]), (3, [])):  # own match of own_n tokens
        drafts = SharedDrafts(table)
        assert drafts.draft([0, 1, 2], 3) == []  # a round without an own draft issues a fetch
        drafts._fetch[1].result(5)  # (test only) let it arrive
        assert drafts.draft([0, 1, 2], 3, own_n=own_n) == expected, own_n
        assert (drafts.num_hits, drafts.num_stale) == (len(expected) > 0, 0)
        assert (drafts._fetch is None) == (not expected)  # a strong own match fetches nothing further


def test_ngram_drafts_from_the_table_where_its_own_match_is_one_token(runner):
    from shared.ngram import NgramProposerFactory, find_ngram_match

    table = SharedNgramTable(runner, CONFIG, "tokhash", f"t{time.monotonic_ns()}", vocab_size=100)
    _run(runner, table._write, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    context = [2, 40, 41, 1, 2]  # own match: [2] -> [40, 41, ...]; the table's [1, 2] -> [3, 4, 5]
    assert find_ngram_match(np.asarray(context), 1, 4, 3) == ([40, 41, 1], 1)
    proposer = NgramProposerFactory(NgramConfig(), table).new_session(context, SamplingParams())
    assert proposer.propose(context, 3).token_ids == [40, 41, 1]  # no fetch has arrived yet
    proposer.shared._fetch[1].result(5)
    assert proposer.propose(context, 3).token_ids == [3, 4, 5]


def test_the_guard_closes_on_low_acceptance_probes_and_reopens():
    from shared.ngram_table import PROBE_EVERY, AcceptanceGuard

    guard = AcceptanceGuard(min_acceptance=0.2)
    assert guard.allows()
    guard.observe(200, 0)  # nothing accepted
    assert guard.rate < 0.2
    allowed = [guard.allows() for _ in range(4 * PROBE_EVERY)]
    assert sum(allowed) == 4  # one probe in PROBE_EVERY lookups
    guard.observe(200, 200)  # the traffic changed: everything accepted
    assert guard.allows()


def test_each_tenant_reads_only_what_its_own_requests_taught(runner):
    table = SharedNgramTable(runner, CONFIG, "tokhash", f"t{time.monotonic_ns()}", vocab_size=100)
    _run(runner, table.for_tenant("key-a")._write, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert table.for_tenant("key-a").fetch([0, 1, 2]).result(5) == [[3, 4, 5, 6]]
    assert table.for_tenant("key-b").fetch([0, 1, 2]).result(5) == []
    assert table.fetch([0, 1, 2]).result(5) == []  # the untenanted table is another one too
    assert table.for_tenant("") is table
    assert table.for_tenant("key-a").guards is table.guards  # acceptance rates stay shared


def test_a_recent_answer_is_reused_without_asking_the_store(runner):
    table = SharedNgramTable(runner, CONFIG, "tokhash", f"t{time.monotonic_ns()}", vocab_size=100)
    _run(runner, table._write, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    local = metrics.SHARED_NGRAM_FETCHES.labels(table.target, "local")
    assert table.fetch([0, 1, 2]).result(5) == [[3, 4, 5, 6]] and local._value.get() == 0
    _run(runner, _noop)  # (test only) the answer's done-callback ran on the store's thread
    again = table.fetch([0, 1, 2])  # the same suffixes again: answered here, already done
    assert again.done() and again.result() == [[3, 4, 5, 6]] and local._value.get() == 1
    assert table.for_tenant("key-a").fetch([0, 1, 2]).result(5) == []  # another tenant's keys
    short = SharedNgramTable(runner, CONFIG.model_copy(update={"local_cache_ttl_s": 0.05}), "tokhash",
                             table.target, vocab_size=100)  # fmt: skip
    short.fetch([0, 1, 2]).result(5)
    _run(runner, _noop)
    time.sleep(0.1)
    _run(runner, table._write, [1, 2, 3, 9, 9, 9, 9])  # learned elsewhere meanwhile
    assert [3, 9, 9, 9] in short.fetch([0, 1, 2]).result(5)  # expired: asked the store again


async def _noop() -> None:
    return None
