"""The drafter pool: every configured drafter's `DrafterFactory`, shared by all targets.

One pool per drafter process. It checks an Open against what it serves (protocol version,
tokenizer hash, method, drafter name), makes per-session proposers, counts open sessions
(`specdec:num_active_sessions{service="drafter"}`) and runs every model forward off the
event loop under `torch.inference_mode()`: session set-up in its executor, drafting in
each drafter's batcher thread, which drafts the rounds of every session waiting at that
moment (and `card`'s branches, on forks of their sessions' caches) in one `propose_batch`.

Every drafter serves every configured target, so `load` attaches them all at start-up and
a drafter whose tokenizer differs from a target's is a configuration error there (a
ValueError naming drafter, target and both hashes), not a rejected Open at request time.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch

from shared import metrics
from shared.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from shared.methods import MODEL_METHODS, RUN_AHEAD_METHODS, SPEC_METHODS
from shared.proposer import EMPTY_DRAFT
from shared.protocol import PROTOCOL_VERSION

if TYPE_CHECKING:
    from shared.config import DrafterConfig, RunAheadConfig, TargetConfig
    from shared.proposer import Draft, DrafterFactory, ForkableProposer, Proposer
    from shared.sampling import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")

def load_factory(config: DrafterConfig) -> DrafterFactory:
    """The factory for one configured drafter (loads its weights)."""
    if config.kind == "sorted":
        from drafter_service.sorted import SortedProposerFactory

        return SortedProposerFactory(config)
    from drafter_service.draft_model import DraftModelProposerFactory

    return DraftModelProposerFactory(config)


def check_tokenizers(drafters: Sequence[DrafterConfig], targets: Sequence[TargetConfig]) -> None:
    """Start-up check from the config alone (tokenizer files, no weights): every drafter of
    the pool serves every target, so each pair must share one tokenizer (ValueError naming
    drafter, target and both hashes otherwise)."""
    from drafter_service.nested import check_tokenizer
    from shared.loading import tokenizer_hash

    target_hashes = {t.name: tokenizer_hash(t.model_dir) for t in targets}
    for d in drafters:
        drafter_hash = tokenizer_hash(d.model_dir)
        for name, target_hash in target_hashes.items():
            check_tokenizer(drafter_hash, target_hash, d.name, name)


def _in_inference_mode(fn: Callable[..., T], *args) -> T:
    # NOTE: inference_mode is thread-local, so it is entered in the executor thread itself.
    with torch.inference_mode():
        return fn(*args)


@dataclass(slots=True)
class _Drafter:
    name: str
    method: str
    factory: DrafterFactory
    tokenizer_hash: str


BranchKey = tuple[int, int]  # (position, alternative token): a branch of card's tree


@dataclass(slots=True)
class Branch:
    """A run-ahead branch (`card`, `shared.draft_tree`) drafted in its session's call, on a
    fork of the session's cache kept for as long as the branch is in the tree."""

    key: BranchKey
    context_ids: list[int]  # the line up to the branch's position, then the alternative
    k: int


@dataclass(slots=True)
class ProposeCall:
    """One round's work for one session (what a Commit asked for)."""

    session: DraftSession
    context_ids: list[int]  # [num_tokens] the verifier's accepted context
    k: int
    num_accepted: int | None = None  # how much of the last draft survived (feedback)
    params: dict[str, float] | None = None  # changed Commit.params, None if unchanged
    branches: list[Branch] = field(default_factory=list)
    adopt: BranchKey | None = None  # the branch a commit took: its fork's cache becomes the session's
    live_branches: set[BranchKey] | None = None  # forks of other branches are freed; None: keep all


@dataclass(slots=True)
class DraftResult:
    draft: Draft
    exit_layers: list[int] = field(default_factory=list)  # per draft token (sorted drafters)
    compute_s: float = 0.0  # drafter CPU seconds: this draft's share of its batch, by tokens
    branch_drafts: list[Draft] = field(default_factory=list)  # one per ProposeCall.branches


class DraftSession:
    """One open session, itself a `Proposer`: the drafter's proposer behind a lock so
    propose and close never overlap (a cancelled stream may close while its last propose
    still runs in a worker thread). Every method blocks: call them off the event loop."""

    __slots__ = ("_pool", "closed", "drafter", "forks", "lock", "proposer", "run_ahead", "target")

    def __init__(
        self, pool: DrafterPool, drafter: str, target: str, proposer: Proposer, run_ahead: RunAheadConfig
    ) -> None:
        self._pool = pool
        self.drafter = drafter
        self.target = target
        self.proposer = proposer
        self.run_ahead = run_ahead  # how a card session grows its tree
        self.forks: dict[BranchKey, ForkableProposer] = {}  # card's branches (`Branch`)
        self.lock = threading.Lock()
        self.closed = False

    def propose(self, context_ids: Sequence[int], k: int) -> Draft:
        with self.lock:
            if self.closed:
                return EMPTY_DRAFT
            return self.proposer.propose(context_ids, k)

    def update(self, num_accepted: int) -> None:
        with self.lock:
            if not self.closed:
                self.proposer.update(num_accepted)

    def set_params(self, params: dict[str, float]) -> None:
        with self.lock:
            if not self.closed:
                self.apply_params_locked(params)

    def prepare_locked(self, call: ProposeCall) -> list[tuple[Proposer, Sequence[int], int]]:
        """Feedback, parameters and branch forks before a propose (the caller holds `lock`);
        returns the (proposer, context, k) of each branch to draft."""
        if call.num_accepted is not None:
            self.proposer.update(call.num_accepted)
        if call.params is not None:
            self.apply_params_locked(call.params)
        if call.adopt is not None and call.adopt in self.forks:
            self.proposer.adopt(self.forks.pop(call.adopt))
        if call.live_branches is not None:
            self.forks = {key: f for key, f in self.forks.items() if key in call.live_branches}
        requests = []
        for b in call.branches:
            fork = self.forks.get(b.key)
            if fork is None:  # a copy of the line's cache: only the branch is drafted anew
                fork = self.forks[b.key] = self.proposer.fork()
            requests.append((fork, b.context_ids, b.k))
        return requests

    def apply_params_locked(self, params: dict[str, float]) -> None:
        """Commit.params (the stream's sticky merge) for proposers that take parameters
        (`set_params`; sorted: `fixed_exit`, `threshold.<exit>`); others have none.
        Parameters the proposer rejects are the verifier's bad input (INVALID_ARGUMENT)."""
        try:
            self.proposer.set_params(params)
        except ValueError as e:
            raise InvalidArgumentError(f"Commit.params: {e}", field="params") from e

    def close(self) -> None:
        """Free the proposer's state; idempotent."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.forks.clear()
            try:
                self.proposer.close()
            finally:
                self._pool._session_closed(self)


def _exit_layers(draft: Draft) -> list[int]:
    return [int(e) for e in draft.exit_layers or []]


class _Batcher:
    """Opportunistic cross-session batching through a drafter factory's `propose_batch`.

    One thread per drafter takes every round queued at the moment it is free and drafts
    them in one batched call (no waiting window: a lone session is never delayed, and under
    load the batch grows by itself). `specdec:drafter_batch_size` records the batch sizes.
    """

    def __init__(self, name: str, propose_batch: Callable, max_batch: int = 32) -> None:
        self.name = name
        self._propose_batch = propose_batch
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, call: ProposeCall) -> Future:
        fut: Future = Future()
        self._queue.put((call, fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        deferred: list = []  # a session already in the batch being formed waits for the next
        stopping = False
        while not stopping:
            item = deferred.pop(0) if deferred else self._queue.get()
            if item is None:
                return
            batch, sessions = [item], {id(item[0].session)}
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                if id(nxt[0].session) in sessions:
                    deferred.append(nxt)
                    continue
                batch.append(nxt)
                sessions.add(id(nxt[0].session))
            self._run_batch(batch)

    def _run_batch(self, batch: list[tuple[ProposeCall, Future]]) -> None:
        locked: list[DraftSession] = []
        todo: list[tuple[ProposeCall, Future]] = []
        try:
            with torch.inference_mode():
                for call, fut in batch:
                    if not fut.set_running_or_notify_cancel():
                        continue  # the stream went away before its turn
                    session = call.session
                    session.lock.acquire()
                    locked.append(session)
                    if session.closed:
                        fut.set_result(DraftResult(EMPTY_DRAFT))
                        continue
                    try:
                        branches = session.prepare_locked(call)
                    except Exception as e:  # noqa: BLE001 - fails this stream only
                        fut.set_exception(e)
                        continue
                    todo.append((call, fut, branches))
                if not todo:
                    return
                requests = []  # every session's line, then its branches
                for call, _, branches in todo:
                    requests.append((call.session.proposer, call.context_ids, call.k))
                    requests.extend(branches)
                t = time.thread_time()  # CPU, not wall: torch runs on this thread (one intra-op thread)
                try:
                    drafts = self._propose_batch(requests)
                except Exception as e:  # noqa: BLE001
                    for _, fut, _ in todo:
                        fut.set_exception(e)
                    return
                cpu_s = time.thread_time() - t
                metrics.DRAFTER_BATCH_SIZE.labels(self.name).observe(len(requests))
                num_tokens = sum(len(d.token_ids) for d in drafts) or 1
                it = iter(drafts)
                for _, fut, branches in todo:
                    own = [next(it) for _ in range(1 + len(branches))]
                    share = cpu_s * sum(len(d.token_ids) for d in own) / num_tokens
                    fut.set_result(DraftResult(own[0], _exit_layers(own[0]), share, own[1:]))
        finally:
            for session in locked:
                session.lock.release()


class DrafterPool:
    """Drafters by name; `open_session` validates an Open and makes a `DraftSession`."""

    def __init__(self, drafters: Sequence[_Drafter], *, max_workers: int = 8) -> None:
        if not drafters:
            raise ValueError("a drafter pool needs at least one drafter")
        self._drafters: dict[str, _Drafter] = {d.name: d for d in drafters}
        if len(self._drafters) != len(drafters):
            raise ValueError(f"duplicate drafter names in {[d.name for d in drafters]}")
        self.executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="drafter")
        self._batchers: dict[str, _Batcher] = {d.name: _Batcher(d.name, d.factory.propose_batch) for d in drafters}
        self._lock = threading.Lock()
        self._active = 0

    @classmethod
    def from_factories(
        cls, factories: Mapping[str, DrafterFactory], tokenizer_hashes: Mapping[str, str], **kwargs
    ) -> DrafterPool:
        drafters = [
            _Drafter(name, f.method, f, tokenizer_hashes[name]) for name, f in factories.items()
        ]
        return cls(drafters, **kwargs)

    @classmethod
    def load(
        cls,
        configs: Sequence[DrafterConfig],
        targets: Sequence[TargetConfig] = (),
        **kwargs,
    ) -> DrafterPool:
        """Load every configured drafter (slow: run it off the event loop) and attach every
        configured target to each (ValueError on a tokenizer mismatch: a config error)."""
        from shared.loading import tokenizer_hash

        check_tokenizers(configs, targets)  # before loading any weights: fail fast
        drafters = []
        for config in configs:
            factory = load_factory(config)
            tok_hash = factory.tokenizer_hash
            drafters.append(_Drafter(config.name, factory.method, factory, tok_hash))
            logger.info(
                "drafter %r loaded: method=%s tokenizer_hash=%s", config.name, factory.method, tok_hash
            )
        pool = cls(drafters, **kwargs)
        pool.attach_targets({t.name: tokenizer_hash(t.model_dir) for t in targets})
        return pool

    def vocab_size(self, drafter: str) -> int:
        return self._drafters[drafter].factory.vocab_size

    def attach_targets(self, target_hashes: Mapping[str, str]) -> None:
        """Attach targets (name -> tokenizer hash) to every drafter: each drafter serves only
        targets with its own tokenizer, so a mismatch raises ValueError naming both."""
        for target, target_hash in target_hashes.items():
            for d in self._drafters.values():
                d.factory.attach_target(target, target_hash)

    # ---------------------------------------------------------------- what it serves

    @property
    def drafter_names(self) -> list[str]:
        return list(self._drafters)

    @property
    def methods(self) -> list[str]:
        return sorted({d.method for d in self._drafters.values()} | set(RUN_AHEAD_METHODS))

    @property
    def tokenizer_hashes(self) -> set[str]:
        return {d.tokenizer_hash for d in self._drafters.values()}

    @property
    def tokenizer_hash(self) -> str:
        """The pool's tokenizer hash (ValueError if its drafters do not share one)."""
        hashes = self.tokenizer_hashes
        if len(hashes) != 1:
            raise ValueError(f"drafters have different tokenizer hashes: {sorted(hashes)}")
        return next(iter(hashes))

    @property
    def active_sessions(self) -> int:
        return self._active

    # ---------------------------------------------------------------- sessions

    def resolve(
        self, protocol_version: int, tokenizer_hash: str, method: str, drafter: str = ""
    ) -> _Drafter:
        """The drafter an Open asks for, or the domain error that rejects it."""
        if protocol_version != PROTOCOL_VERSION:
            raise FailedPreconditionError(
                f"protocol version {protocol_version} is not this drafter's {PROTOCOL_VERSION}",
                field="protocol_version",
            )
        if method not in SPEC_METHODS:
            raise InvalidArgumentError(f"unknown method {method!r}", field="method")
        if method not in MODEL_METHODS:
            raise InvalidArgumentError(
                f"method {method!r} runs inside the verifier, not in the drafter pool", field="method"
            )
        run_ahead = method in RUN_AHEAD_METHODS  # any drafter of the pool drafts ahead
        if drafter:
            found = self._drafters.get(drafter)
            if found is None:
                raise NotFoundError(
                    f"drafter {drafter!r} is not in this pool ({self.drafter_names})", field="drafter"
                )
            if found.method != method and not run_ahead:
                raise InvalidArgumentError(
                    f"drafter {drafter!r} serves {found.method!r}, not {method!r}", field="method"
                )
            candidates = [found]
        else:
            candidates = [d for d in self._drafters.values() if d.method == method or run_ahead]
            if not candidates:
                raise NotFoundError(
                    f"no drafter serves method {method!r} (pool serves {self.methods})", field="method"
                )
        for d in candidates:
            if d.tokenizer_hash == tokenizer_hash:
                return d
        raise FailedPreconditionError(
            f"tokenizer hash {tokenizer_hash!r} differs from the drafter's "
            f"{sorted({d.tokenizer_hash for d in candidates})}: the target and the drafter "
            "must share one tokenizer",
            field="tokenizer_hash",
        )

    def open_session(
        self,
        target: str,
        tokenizer_hash: str,
        protocol_version: int,
        method: str,
        drafter: str,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
    ) -> DraftSession:
        """Validate an Open and make its session (blocking: call it in the executor)."""
        chosen = self.resolve(protocol_version, tokenizer_hash, method, drafter)
        if target not in chosen.factory.targets:
            chosen.factory.attach_target(target, tokenizer_hash)
        proposer = chosen.factory.new_session(prompt_ids, sampling)
        run_ahead = chosen.factory.config.run_ahead
        if method in RUN_AHEAD_METHODS:  # drafts are trees: the line and its runner-ups
            proposer.num_alternatives = run_ahead.alternatives
        session = DraftSession(self, chosen.name, target, proposer, run_ahead)
        with self._lock:
            self._active += 1
        metrics.NUM_ACTIVE_SESSIONS.labels("drafter", chosen.name).inc()
        return session

    def _session_closed(self, session: DraftSession) -> None:
        with self._lock:
            self._active -= 1
        metrics.NUM_ACTIVE_SESSIONS.labels("drafter", session.drafter).dec()

    # ---------------------------------------------------------------- executor

    async def run(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` in the pool's executor under `torch.inference_mode()`."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, _in_inference_mode, fn, *args)

    async def propose(self, call: ProposeCall) -> DraftResult:
        """One round for one session, off the event loop, batched with the rounds of the
        drafter's other sessions waiting at that moment."""
        return await asyncio.wrap_future(self._batchers[call.session.drafter].submit(call))

    def shutdown(self) -> None:
        for batcher in self._batchers.values():
            batcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
