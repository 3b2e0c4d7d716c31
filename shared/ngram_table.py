"""The shared n-gram table: continuations learned from every request's accepted output,
read by `ngram` where the request's own context has no strong match.

    specdec:ng:[<tenant>:]<tokenizer_hash>:<target>:<n>:<context_hash>  ->  sorted set
        member = the continuation (`continuation_len` int32 little-endian tokens)
        score  = how often it followed that n-token context

Writes (`learn`) happen when any request finishes, whatever its method (the verifier's
servicer calls it with the result): its output (and its prompt only when `learn_prompts`)
is queued, and the store's own thread turns it into one pipelined batch of count
increments (each key trimmed to its `keep_top` best and given a TTL).

Reads never block a round (`SharedDrafts`): each round whose own prompt-lookup match is
shorter than `own_match_min` tokens (none, or a weak one) uses the last fetch that has
arrived *and* still aligns with the tokens emitted since it was issued (falling back to its
own draft when there is none), then issues the next fetch for the current context;
rounds with a strong own match issue none.
A fetch issued at round r is thus used at round r + 1 if it is there, or later while the
emitted tokens follow its continuation.

Contamination guard (`AcceptanceGuard`): per target and sampling mode, the measured
per-token acceptance of the table's drafts (an exponential average) must stay at
`min_acceptance` or above for the table to be read; below it, one lookup in `PROBE_EVERY`
still fetches and drafts, so the measure recovers when the traffic changes. An unrelated
workload (or sampled decoding, whose draws rarely follow another request's output) thus
costs a few probe rounds, never the request-only `ngram`'s own drafts (those always come
first), and a closed guard costs no fetches.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import cachetools
import numpy as np

from shared import metrics
from shared.loading import context_hash

if TYPE_CHECKING:
    from shared.config import SharedNgramConfig
    from shared.store import StoreRunner

logger = logging.getLogger(__name__)

PROBE_EVERY = 16  # while the guard is closed, one lookup in this many still drafts
MAX_SKIP = 8  # after empty answers, at most one fetch per this many lookups
FETCH_PER_KEY = 2  # continuations read per context suffix


def ngram_key(tokenizer_hash: str, target: str, context: Sequence[int], tenant: str = "") -> str:
    """DESIGN.md's key, with the tenant segment after `ng:` for a tenant's own table."""
    return f"specdec:ng:{tenant_segment(tenant)}{tokenizer_hash}:{target}:{len(context)}:{context_hash(list(context))}"


def tenant_segment(tenant: str) -> str:
    """A tenant's key segment (the router's key ids start with `key-`, so they never read
    as a tokenizer hash or target); "" for the state every tenant shares."""
    return f"{tenant}:" if tenant else ""


def pack(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, dtype="<i4").tobytes()


def unpack(value: bytes, length: int, vocab_size: int) -> list[int] | None:
    """A stored continuation, or None when it is not one of ours (wrong size, ids out of range)."""
    if len(value) != 4 * length:
        return None
    tokens = np.frombuffer(value, dtype="<i4")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        return None
    return tokens.tolist()


class AcceptanceGuard:
    """Per-token acceptance of the table's drafts for one target (an exponential average)."""

    def __init__(self, min_acceptance: float, decay: float = 0.98) -> None:
        self.min_acceptance = min_acceptance
        self.decay = decay
        self.rate = 0.5  # optimistic start: the first drafts measure it
        self._closed_lookups = 0

    def allows(self) -> bool:
        if self.rate >= self.min_acceptance:
            return True
        self._closed_lookups += 1
        return self._closed_lookups % PROBE_EVERY == 0

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        for i in range(num_drafted):
            self.rate = self.decay * self.rate + (1 - self.decay) * (i < num_accepted)


class SharedNgramTable:
    """One target's view of the table (one per verifier process and target)."""

    def __init__(self, runner: StoreRunner, config: SharedNgramConfig, tokenizer_hash: str, target: str,
                 vocab_size: int, *, learn: bool = True) -> None:  # fmt: skip
        self.runner = runner
        self.learns = learn  # False: a read-only view (benchmarks measuring on held-out prompts)
        self.config = config
        self.tokenizer_hash = tokenizer_hash
        self.target = target
        self.tenant = ""  # whose table this view is (`for_tenant`); "": the shared one
        self.vocab_size = vocab_size
        # per sampling mode: greedy outputs repeat each other far more than sampled ones
        self.guards = {True: AcceptanceGuard(config.min_acceptance), False: AcceptanceGuard(config.min_acceptance)}
        # recent answers by their keys (tenant views share it: the keys name the tenant)
        self._recent = cachetools.TTLCache(config.local_cache_entries, config.local_cache_ttl_s)
        self._recent_lock = threading.Lock()  # the step thread reads, the store's thread fills

    def for_tenant(self, tenant: str) -> SharedNgramTable:
        """The table one tenant's requests read and teach: keys of their own (the guards,
        which hold acceptance rates, not data, stay shared); "" = this table."""
        if not tenant:
            return self
        view = copy.copy(self)
        view.tenant = tenant
        return view

    # ---------------------------------------------------------------- writes

    def learn(self, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> None:
        """Queue one finished request's output (after its prompt where `learn_prompts`);
        the store's thread writes it. Never blocks."""
        tokens = [*prompt_ids, *output_ids] if self.config.learn_prompts else list(output_ids)
        if self.learns and len(tokens) > self.config.min_n:
            self.runner.submit(self._write, tokens).add_done_callback(_log_failure)

    def updates(self, tokens: list[int]) -> list[tuple[str, bytes, float]]:
        cfg = self.config
        out = []
        for i in range(cfg.min_n, len(tokens) - cfg.continuation_len + 1):
            member = pack(tokens[i : i + cfg.continuation_len])
            for n in range(cfg.min_n, min(cfg.max_n, i) + 1):
                out.append((ngram_key(self.tokenizer_hash, self.target, tokens[i - n : i], self.tenant), member, 1.0))
        return out

    async def _write(self, tokens: list[int]) -> None:
        updates = self.updates(tokens)
        if updates:
            await self.runner.store.incr_counts(updates, self.config.keep_top, self.config.ttl_s)

    # ---------------------------------------------------------------- reads

    def fetch(self, context: Sequence[int]) -> concurrent.futures.Future[list[list[int]]]:
        """Continuations of the context's suffixes, best first: longer suffixes first, then
        by count (empty: none). Several, because the round that uses them has emitted
        tokens since: the best one may no longer align where a runner-up still does."""
        cfg = self.config
        ns = [n for n in range(min(cfg.max_n, len(context)), cfg.min_n - 1, -1)]
        keys = tuple(ngram_key(self.tokenizer_hash, self.target, context[len(context) - n :], self.tenant) for n in ns)
        with self._recent_lock:
            recent = self._recent.get(keys)
        if recent is not None:  # NOTE: the same contexts recur across requests (and loops):
            # answering them here spares the store's thread, which competes with the step
            # thread for the GIL and the cores, a parse of the same reply
            metrics.SHARED_NGRAM_FETCHES.labels(self.target, "local").inc()
            done: concurrent.futures.Future[list[list[int]]] = concurrent.futures.Future()
            done.set_result(recent)
            return done
        future = self.runner.submit(self._read, list(keys))
        future.add_done_callback(functools.partial(self._remember, keys))
        return future

    def _remember(self, keys: tuple[str, ...], future: concurrent.futures.Future) -> None:
        if future.exception() is None:
            with self._recent_lock:
                self._recent[keys] = future.result()

    async def _read(self, keys: list[str]) -> list[list[int]]:
        out: list[list[int]] = []
        for entries in await self.runner.store.top(keys, FETCH_PER_KEY):
            for value, _ in entries:
                tokens = unpack(value, self.config.continuation_len, self.vocab_size)
                if tokens is None:  # foreign: skipped, the learned ones below it still count
                    metrics.STORE_BAD_VALUES.labels(self.runner.store.name).inc()
                elif tokens not in out:
                    out.append(tokens)
        return out


def _log_failure(future: concurrent.futures.Future) -> None:
    if future.exception() is not None:
        logger.debug("shared n-gram write failed: %s", future.exception())


def _aligned(continuations: list[list[int]], emitted: list[int], k: int) -> list[int]:
    """Up to k tokens of the first continuation that the emitted tokens follow."""
    for continuation in continuations:
        if continuation[: len(emitted)] == emitted and len(continuation) > len(emitted):
            return continuation[len(emitted) : len(emitted) + k]
    return []


class SharedDrafts:
    """One session's non-blocking use of the table (see the module docstring)."""

    def __init__(self, table: SharedNgramTable, greedy: bool = True) -> None:
        self.table = table
        self.guard = table.guards[greedy]
        self._fetch: tuple[list[int], concurrent.futures.Future] | None = None  # (context then, future)
        self.last_draft_len = 0  # tokens of the last draft that came from the table
        self.num_hits = 0
        self.num_stale = 0
        # NOTE: after empty answers in a row, fetch only every 2, 4, then 8 lookups: a table
        # with nothing for this request costs a hash and a thread hop per round for nothing.
        # Not after stale ones: the table had something, and the next round may align
        self._empty_in_row = 0
        self._skip = 0

    def draft(self, context: Sequence[int], k: int, own_n: int = 0) -> list[int]:
        """Up to k tokens from the last arrived fetch that still aligns, unless the
        request's own draft matched `own_n` >= `own_match_min` tokens (0: no own draft);
        then, on such a round, issues the next fetch for the round after it."""
        self.last_draft_len = 0
        out: list[int] = []
        model = self.table.target
        # NOTE: a 1-2 token match in the request's own text is weak evidence; the table's
        # continuation of a 2-4 token context from other requests' outputs beat it
        # (bench.shared_ngram cross-prompt, tokens per forward: target-s 1.12x -> 1.16x,
        # target-m 1.20x -> 1.24x), and replacing longer own matches lost (1.07x)
        usable = own_n < self.table.config.own_match_min
        if self._fetch is not None:
            then, future = self._fetch
            if not future.done():
                if usable:
                    metrics.SHARED_NGRAM_FETCHES.labels(model, "late").inc()
                return []  # the fetch in flight serves a later round
            self._fetch = None
            if future.exception() is not None:
                metrics.SHARED_NGRAM_FETCHES.labels(model, "failed").inc()
            elif not (continuations := future.result()):
                if usable:
                    metrics.SHARED_NGRAM_FETCHES.labels(model, "empty").inc()
                self._back_off()  # the table has nothing here either
            else:
                self._empty_in_row = 0
                if usable:
                    if list(context[: len(then)]) == then:
                        out = _aligned(continuations, list(context[len(then) :]), k)
                    if not out:
                        self.num_stale += 1
                        metrics.SHARED_NGRAM_FETCHES.labels(model, "stale").inc()
                    else:
                        self.num_hits += 1
                        metrics.SHARED_NGRAM_FETCHES.labels(model, "hit").inc()
                        metrics.SHARED_NGRAM_TOKENS.labels(model, "drafted").inc(len(out))
        if usable:  # NOTE: a strong own match (a loop) tends to hold next round too; fetching
            # only after weak rounds kept the tokens per forward and cut round time (target-s
            # on Redis, cross-prompt: tok/s 1.00x -> 1.07x request-only)
            self._issue(context)
        self.last_draft_len = len(out)
        return out

    def _back_off(self) -> None:
        self._empty_in_row += 1
        self._skip = min(2**self._empty_in_row, MAX_SKIP) - 1

    def _issue(self, context: Sequence[int]) -> None:
        if self._skip:
            self._skip -= 1
        elif len(context) < self.table.config.min_n:
            return
        elif not self.guard.allows():
            metrics.SHARED_NGRAM_FETCHES.labels(self.table.target, "guarded").inc()
        else:
            self._fetch = (list(context), self.table.fetch(context))

    def update(self, num_accepted: int) -> None:
        if self.last_draft_len:
            accepted = min(num_accepted, self.last_draft_len)
            self.guard.observe(self.last_draft_len, accepted)
            metrics.SHARED_NGRAM_TOKENS.labels(self.table.target, "accepted").inc(accepted)
            self.last_draft_len = 0
