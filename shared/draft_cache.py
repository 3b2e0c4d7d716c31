"""The repeated-prompt draft cache: a greedy request's output, stored under its prompt's
hash, drafts the next request with the same prompt (on any replica, with Redis).

    specdec:draft:[<tenant>:]<target>:<prefix_hash>  ->  the output's first `max_tokens` tokens,
                                              int32 little-endian; TTL `ttl_s`

(`prefix_hash`: DESIGN.md "Identifiers", blake2b of the prompt's int32 ids.) Greedy
decoding is deterministic, so a prompt seen before mostly emits what its entry holds and
whole drafts are accepted. A draft is only a proposal: a wrong, old or foreign entry
costs acceptance, never output (verification is unchanged).

Writes (`DraftCache.record`): when a greedy request finishes, the verifier queues its
output and the store's thread writes it, never awaited. A write that the entry already
covers (the new output is a prefix of it: a shorter `max_new_tokens`) is skipped, so a
short request does not shorten what a long one stored.

Reads (`CachedContinuation`): when a request starts, one fetch for its prompt; rounds
poll `done()` and never wait. Once the answer is there, each round drafts from the
continuation while the tokens emitted so far agree with it; the first disagreement drops
it (counted `divergent`). Rounds before the answer, or after the entry was dropped or
used up, draft with the request's own method as before.

`CachedProposerFactory` puts that in front of any method's proposer (in-process and
pipelined/remote alike): the cache drafts first, the method's proposer otherwise.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from shared import metrics
from shared.loading import context_hash
from shared.ngram_table import tenant_segment
from shared.proposer import Draft, PipelinedProposer

if TYPE_CHECKING:
    from shared.config import DraftCacheConfig
    from shared.proposer import Proposer, ProposerFactory
    from shared.sampling import SamplingParams
    from shared.store import StoreRunner

logger = logging.getLogger(__name__)


def draft_key(target: str, prompt: Sequence[int], tenant: str = "") -> str:
    """DESIGN.md's key, with the tenant segment after `draft:` for a tenant's own entries."""
    return f"specdec:draft:{tenant_segment(tenant)}{target}:{context_hash(list(prompt))}"


def pack(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, dtype="<i4").tobytes()


def unpack(value: bytes | None, max_tokens: int, vocab_size: int) -> list[int] | None:
    """A stored draft, or None when it is not one of ours (empty, not whole int32s, longer
    than `max_tokens`, ids out of range)."""
    if not value or len(value) % 4 or len(value) > 4 * max_tokens:
        return None
    tokens = np.frombuffer(value, dtype="<i4")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        return None
    return tokens.tolist()


@dataclass(frozen=True, slots=True)
class Lookup:
    """One fetch's answer: the cached continuation (None: none usable) and why."""

    tokens: list[int] | None
    result: str  # hit, miss or bad


class DraftCache:
    """One target's view of the cache (one per verifier process and target)."""

    def __init__(self, runner: StoreRunner, config: DraftCacheConfig, target: str, vocab_size: int) -> None:
        self.runner = runner
        self.config = config
        self.target = target
        self.tenant = ""  # whose entries this view reads and writes (`for_tenant`); "": shared
        self.vocab_size = vocab_size

    def for_tenant(self, tenant: str) -> DraftCache:
        """The cache one tenant's requests read and fill ("" = this one)."""
        if not tenant:
            return self
        view = copy.copy(self)
        view.tenant = tenant
        return view

    # ---------------------------------------------------------------- writes

    def record(self, prompt: Sequence[int], output: Sequence[int], greedy: bool) -> concurrent.futures.Future | None:
        """Queue a finished request's output; the store's thread writes it (the future: for
        tests and benchmarks; the verifier never waits for it). Only greedy outputs: a
        sampled one is one draw, a poor draft for the next."""
        if not greedy or len(output) < self.config.min_tokens:
            return None
        tokens = list(output[: self.config.max_tokens])
        future = self.runner.submit(self._write, draft_key(self.target, prompt, self.tenant), tokens)
        future.add_done_callback(self._written)
        return future

    async def _write(self, key: str, tokens: list[int]) -> None:
        store = self.runner.store
        # NOTE: read-then-write is not atomic; two writers race only with outputs of the same
        # greedy prompt, so either value is right
        current = unpack(await store.get(key), self.config.max_tokens, self.vocab_size)
        if current is not None and current[: len(tokens)] == tokens:
            return  # the entry already holds this output (and maybe more)
        await store.set_ex(key, pack(tokens), self.config.ttl_s)

    def _written(self, future: concurrent.futures.Future) -> None:
        if future.exception() is not None:
            logger.debug("draft cache write failed: %s", future.exception())
            metrics.DRAFT_CACHE_WRITES.labels(self.target, "failed").inc()
        else:
            metrics.DRAFT_CACHE_WRITES.labels(self.target, "written").inc()

    # ---------------------------------------------------------------- reads

    def fetch(self, prompt: Sequence[int]) -> concurrent.futures.Future[Lookup]:
        return self.runner.submit(self._read, draft_key(self.target, prompt, self.tenant))

    async def _read(self, key: str) -> Lookup:
        value = await self.runner.store.get(key)
        if value is None:  # (b"" is a foreign value: bad below)
            return Lookup(None, "miss")
        tokens = unpack(value, self.config.max_tokens, self.vocab_size)
        if tokens is None:
            metrics.STORE_BAD_VALUES.labels(self.runner.store.name).inc()
            return Lookup(None, "bad")
        return Lookup(tokens, "hit")


class CachedContinuation:
    """One request's use of the cache (see the module docstring)."""

    def __init__(self, cache: DraftCache, prompt: Sequence[int]) -> None:
        self.cache = cache
        self.prompt_len = len(prompt)
        self._future: concurrent.futures.Future[Lookup] | None = cache.fetch(prompt)
        self._tokens: list[int] | None = None  # the arrived continuation while it agrees
        self._agreed = 0  # emitted tokens already checked against it
        self.result = ""  # the lookup's, once arrived
        self.num_drafted = 0  # rounds that drafted from the cache
        self.last_draft_len = 0

    def draft(self, context: Sequence[int], k: int) -> list[int]:
        """Up to k tokens of the continuation after what `context` emitted; [] while the
        answer is not there, when there is none, or once the emitted tokens left it."""
        self.last_draft_len = 0
        if self._future is not None:
            if not self._future.done():
                return []  # the next round looks again
            self._resolve(self._future)
            self._future = None
        tokens = self._tokens
        if tokens is None:
            return []
        emitted = len(context) - self.prompt_len
        if emitted < self._agreed:
            self._agreed = 0  # (never in the verifier: its context only grows) check again
        checked = min(emitted, len(tokens))
        start = self.prompt_len + self._agreed
        if list(context[start : self.prompt_len + checked]) != tokens[self._agreed : checked]:
            self._tokens = None
            metrics.DRAFT_CACHE_LOOKUPS.labels(self.cache.target, "divergent").inc()
            return []
        self._agreed = checked
        out = tokens[emitted : emitted + k]
        if not out:
            self._tokens = None  # used up: the method's proposer from here on
            return []
        self.last_draft_len = len(out)
        self.num_drafted += 1
        metrics.DRAFT_CACHE_TOKENS.labels(self.cache.target, "drafted").inc(len(out))
        return out

    def _resolve(self, future: concurrent.futures.Future[Lookup]) -> None:
        if future.exception() is not None:
            self.result = "failed"
        else:
            lookup = future.result()
            self.result, self._tokens = lookup.result, lookup.tokens
        metrics.DRAFT_CACHE_LOOKUPS.labels(self.cache.target, self.result).inc()

    def update(self, num_accepted: int) -> None:
        if self.last_draft_len:
            accepted = min(num_accepted, self.last_draft_len)
            metrics.DRAFT_CACHE_TOKENS.labels(self.cache.target, "accepted").inc(accepted)
            self.last_draft_len = 0


class CachedProposer:
    """A method's proposer with the cache in front (implements `Proposer`)."""

    def __init__(self, inner: Proposer, cached: CachedContinuation) -> None:
        self.inner = inner
        self.cached = cached

    def propose(self, context_ids: Sequence[int], k: int) -> Draft:
        draft = self.cached.draft(context_ids, k)
        if draft:
            return Draft(token_ids=draft)
        return self.inner.propose(context_ids, k)

    def update(self, num_accepted: int) -> None:
        # the feedback belongs to whoever drafted this round
        if self.cached.last_draft_len:
            self.cached.update(num_accepted)
        else:
            self.inner.update(num_accepted)

    def set_params(self, params: dict[str, float]) -> None:
        self.inner.set_params(params)

    def close(self) -> None:
        self.inner.close()


class CachedPipelinedProposer(CachedProposer):
    """The same for a pipelined (remote) proposer: a round the cache drafts asks the
    drafter for nothing (k = 0, which also stops a run-ahead drafter until it is needed)."""

    inner: PipelinedProposer

    def __init__(self, inner: PipelinedProposer, cached: CachedContinuation) -> None:
        super().__init__(inner, cached)
        self._draft: Draft | None = None

    def request(self, context_ids: Sequence[int], k: int) -> None:
        draft = self.cached.draft(context_ids, k)
        self._draft = Draft(token_ids=draft) if draft else None
        self.inner.request(context_ids, 0 if draft else k)

    @property
    def catching_up(self) -> bool:
        return self._draft is None and self.inner.catching_up

    def collect(self, deadline: float) -> Draft:
        if self._draft is not None:
            draft, self._draft = self._draft, None
            return draft
        return self.inner.collect(deadline)

    def take_compute_s(self) -> float:
        return self.inner.take_compute_s()


class CachedProposerFactory:
    """Any method's factory with the cache in front of its sessions (greedy requests only,
    unless `sampled`)."""

    def __init__(self, inner: ProposerFactory, cache: DraftCache) -> None:
        self.inner = inner
        self.cache = cache
        self.method = inner.method

    def new_session(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> Proposer:
        session = self.inner.new_session(prompt_ids, sampling)
        if not (sampling.greedy or self.cache.config.sampled):
            return session
        cached = CachedContinuation(self.cache, prompt_ids)
        if isinstance(session, PipelinedProposer):
            return CachedPipelinedProposer(session, cached)
        return CachedProposer(session, cached)
