"""The repeated-prompt draft cache (`shared.draft_cache`) on the in-memory store and a real
`redis-server`: packing, greedy-only bounded writes that never shorten an entry,
non-blocking reads, drafts while the emitted tokens agree (a divergent entry is dropped),
foreign values ignored and counted, and the proposer wrapper in front of `ngram` and of a
pipelined proposer."""

from __future__ import annotations

import asyncio
import time

from shared import metrics
from shared.config import DraftCacheConfig, NgramConfig
from shared.draft_cache import (
    CachedContinuation,
    CachedPipelinedProposer,
    CachedProposer,
    CachedProposerFactory,
    DraftCache,
    draft_key,
    pack,
    unpack,
)
from shared.ngram import NgramProposerFactory
from shared.proposer import Draft
from shared.store import RedisStore, StoreRunner
from shared.types import SamplingParams

CONFIG = DraftCacheConfig(enabled=True, max_tokens=8, min_tokens=2)
PROMPT = [5, 6, 7]


def _cache(runner, config=CONFIG) -> DraftCache:
    return DraftCache(runner, config, f"t{time.monotonic_ns()}", vocab_size=100)  # a fresh namespace


def _count(metric, *labels) -> float:
    return metric.labels(*labels)._value.get()


def test_key_and_packing():
    assert draft_key("m", [1, 2]) == draft_key("m", [1, 2]) != draft_key("m", [2, 1])
    assert draft_key("m", [1, 2]).startswith("specdec:draft:m:") and len(draft_key("m", [1, 2])) == 16 + 16
    assert unpack(pack([0, 3, 99]), 8, 100) == [0, 3, 99]
    for bad in (b"", b"abc", pack([1, 100]), pack([-1]), pack(range(9))):  # empty, ragged, vocab, sign, too long
        assert unpack(bad, 8, 100) is None


def test_greedy_outputs_are_written_bounded_and_never_shortened(runner):
    cache = _cache(runner)
    assert cache.record(PROMPT, [1, 2, 3], greedy=False) is None  # a sampled draw: not stored
    assert cache.record([9], [1], greedy=True) is None  # shorter than min_tokens
    assert cache.fetch(PROMPT).result(5).result == "miss"
    assert cache.fetch([9]).result(5).result == "miss"
    cache.record(PROMPT, list(range(20)), greedy=True).result(5)
    assert cache.fetch(PROMPT).result(5).tokens == list(range(8))  # the first max_tokens
    cache.record(PROMPT, [0, 1, 2], greedy=True).result(5)  # a shorter request with the same output
    assert cache.fetch(PROMPT).result(5).tokens == list(range(8))
    cache.record(PROMPT, [0, 1, 9], greedy=True).result(5)  # a different output (a new model): replaces it
    assert cache.fetch(PROMPT).result(5).tokens == [0, 1, 9]


def test_foreign_values_are_ignored_and_counted(runner):
    cache = _cache(runner)
    bad = metrics.STORE_BAD_VALUES.labels(runner.store.name)
    for value in (b"junk!", pack(list(range(9))), pack([1, 500])):  # ragged, oversized, out of vocabulary
        runner.submit(runner.store.set_ex, draft_key(cache.target, PROMPT), value, 60).result(5)
        before, lookups = bad._value.get(), _count(metrics.DRAFT_CACHE_LOOKUPS, cache.target, "bad")
        cached = CachedContinuation(cache, PROMPT)
        cached._future.result(5)  # (test only) let the answer arrive
        assert cached.draft(PROMPT, 4) == [] and cached.result == "bad"
        assert bad._value.get() == before + 1
        assert _count(metrics.DRAFT_CACHE_LOOKUPS, cache.target, "bad") == lookups + 1
    # a real output replaces the foreign value
    cache.record(PROMPT, [1, 2, 3], greedy=True).result(5)
    assert cache.fetch(PROMPT).result(5).tokens == [1, 2, 3]


def test_redis_wrong_type_under_the_key_is_a_bad_value(redis_server):
    runner = StoreRunner(RedisStore(redis_server.url))
    try:
        cache = _cache(runner)
        key = draft_key(cache.target, PROMPT)
        runner.submit(runner.store.incr_counts, [(key, b"x", 1.0)], 4, 60).result(5)  # a sorted set
        before = _count(metrics.STORE_BAD_VALUES, "redis")
        assert cache.fetch(PROMPT).result(5).result == "bad"
        assert _count(metrics.STORE_BAD_VALUES, "redis") == before + 1
    finally:
        runner.close()


def test_drafts_while_emitted_tokens_agree_then_drops_a_divergent_entry(runner):
    cache = _cache(runner)
    cache.record(PROMPT, [10, 11, 12, 13, 14, 15], greedy=True).result(5)
    cached = CachedContinuation(cache, PROMPT)
    cached._future.result(5)  # (test only) let the answer arrive
    assert cached.draft(PROMPT, 3) == [10, 11, 12]
    assert cached.draft(PROMPT + [10, 11], 3) == [12, 13, 14]
    cached.update(1)
    assert _count(metrics.DRAFT_CACHE_TOKENS, cache.target, "accepted") == 1
    divergent = _count(metrics.DRAFT_CACHE_LOOKUPS, cache.target, "divergent")
    assert cached.draft(PROMPT + [10, 11, 12, 99], 3) == []  # emitted 99 where the entry has 13
    assert _count(metrics.DRAFT_CACHE_LOOKUPS, cache.target, "divergent") == divergent + 1
    assert cached.draft(PROMPT + [10, 11, 12, 99, 14], 3) == []  # dropped for good
    assert cached.result == "hit" and cached.num_drafted == 2


def test_a_used_up_entry_is_dropped_without_counting_divergence(runner):
    cache = _cache(runner)
    cache.record(PROMPT, [10, 11], greedy=True).result(5)
    cached = CachedContinuation(cache, PROMPT)
    cached._future.result(5)
    assert cached.draft(PROMPT + [10], 4) == [11]
    divergent = _count(metrics.DRAFT_CACHE_LOOKUPS, cache.target, "divergent")
    assert cached.draft(PROMPT + [10, 11, 3], 4) == []
    assert _count(metrics.DRAFT_CACHE_LOOKUPS, cache.target, "divergent") == divergent
    assert cached._tokens is None


def test_reads_never_wait():
    class Slow:  # a store that answers after half a second
        name = "memory"

        async def get(self, key):
            await asyncio.sleep(0.5)
            return pack([1, 2])

        async def close(self):
            pass

    runner = StoreRunner(Slow())
    try:
        cached = CachedContinuation(DraftCache(runner, CONFIG, "t-slow", 100), PROMPT)
        t = time.perf_counter()
        assert cached.draft(PROMPT, 4) == []  # not there yet: the round goes on without it
        assert time.perf_counter() - t < 0.05
        cached._future.result(5)
        assert cached.draft(PROMPT, 4) == [1, 2]  # a later round uses it
    finally:
        runner.close()


def test_ngram_drafts_from_the_cache_first_then_falls_back(runner):
    cache = _cache(runner)
    factory = CachedProposerFactory(NgramProposerFactory(NgramConfig(min_n=1, max_n=2)), cache)
    assert factory.method == "ngram"
    prompt = [1, 2, 3, 1, 2]  # prompt lookup alone drafts [3, 1, 2]
    cache.record(prompt, [7, 8, 9], greedy=True).result(5)
    proposer = factory.new_session(prompt, SamplingParams())
    assert isinstance(proposer, CachedProposer)
    proposer.cached._future.result(5)
    assert proposer.propose(prompt, 3).token_ids == [7, 8, 9]
    proposer.update(3)
    # the emitted tokens left the entry: prompt lookup drafts again
    assert proposer.propose(prompt + [3], 3).token_ids == [1, 2, 3]
    # sampled requests do not read the cache (config.sampled off)
    assert not isinstance(factory.new_session(prompt, SamplingParams(temperature=0.8)), CachedProposer)
    proposer.close()


def test_pipelined_proposers_ask_the_drafter_for_nothing_while_the_cache_drafts(runner):
    class Remote:  # records what the loop would send the drafter pool
        method = "remote"
        catching_up = False

        def __init__(self):
            self.asked: list[int] = []

        def new_session(self, prompt_ids, sampling):
            return self

        def request(self, context_ids, k):
            self.asked.append(k)

        def collect(self, deadline):
            return Draft(token_ids=[0] * self.asked[-1])

        def take_compute_s(self):
            return 0.0

        def propose(self, context_ids, k):
            raise AssertionError("pipelined: the loop requests and collects")

        def update(self, num_accepted):
            pass

        def set_params(self, params):
            pass

        def close(self):
            pass

    cache = _cache(runner)
    cache.record(PROMPT, [20, 21], greedy=True).result(5)
    remote = Remote()
    proposer = CachedProposerFactory(remote, cache).new_session(PROMPT, SamplingParams())
    assert isinstance(proposer, CachedPipelinedProposer)
    proposer.cached._future.result(5)
    proposer.request(PROMPT, 4)
    assert proposer.collect(0.0).token_ids == [20, 21] and remote.asked == [0]
    proposer.request(PROMPT + [20, 21], 4)  # used up: the drafter drafts
    assert proposer.collect(0.0).token_ids == [0, 0, 0, 0] and remote.asked == [0, 4]


def test_each_tenant_has_its_own_entries(runner):
    cache = _cache(runner)
    cache.for_tenant("key-a").record(PROMPT, list(range(8)), greedy=True).result(5)
    assert cache.for_tenant("key-a").fetch(PROMPT).result(5).tokens == list(range(8))
    assert cache.for_tenant("key-b").fetch(PROMPT).result(5).result == "miss"
    assert cache.fetch(PROMPT).result(5).result == "miss"
