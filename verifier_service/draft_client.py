"""The verifier's side of `DrafterService.Draft`: a `Proposer` backed by the remote pool.

The batched loop calls `request(context_ids, k)` for every row that drafts remotely, then
`collect(deadline)` for each (`shared.proposer.PipelinedProposer`; `propose` = both), from
its step thread, so the client is synchronous: one sync gRPC stream per session, requests
fed from a queue (gRPC's own thread consumes the iterator) and responses drained by a
reader thread into another queue. Per round:

    request: Commit{epoch + 1, accepted_length = common prefix with what the drafter has,
                    token_ids = the new tail, num_speculative_tokens = k}
    collect: wait for that epoch's Candidates until the deadline; older epochs are stale
             (a round that timed out) and dropped.

A drafter far behind the context (a new stream, or more than `catch_up_tokens` tokens
decoded plainly since its last round: the load-aware policy's probes, a new request) is
sent it without being waited for: `request` sets `catching_up`, `collect` returns an empty
draft at once, and later rounds ask nothing until that Commit's Candidates have arrived
(or `catch_up_timeout_s` has passed). The row decodes plainly meanwhile, while the pool
prefills, instead of the whole step waiting on the prefill. (`propose`, one round alone,
still waits.)

`set_params` (the policy's exit thresholds) is sticky on both ends: each Commit carries
only the keys whose value the drafter's stream does not have yet.

Failures never fail the request (DESIGN: slower, never wrong): a timeout, an error or a
drafter that is down makes `propose` return an empty draft (k = 0 for that round). A broken
stream (or `max_consecutive_timeouts` timeouts in a row, e.g. a hung drafter) is dropped
and the proposer is *degraded*: it reopens a new stream, with the whole current context as
the prompt, at most every `retry_interval_s`, so speculation resumes once the drafter is
back. Rejections that retrying cannot fix (FAILED_PRECONDITION: tokenizer or protocol
mismatch; NOT_FOUND / INVALID_ARGUMENT: method or drafter not served) stop retrying.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import tenacity

from shared import tls
from shared.draft_tree import RunAheadTree, is_chain
from shared.errors import status_from_int
from shared.methods import RUN_AHEAD_METHODS
from shared.pb.specdec.v1 import drafter_pb2, drafter_pb2_grpc
from shared.proposer import Draft, common_prefix_len
from shared.protocol import PROTOCOL_VERSION
from shared.run_ahead import extends
from shared.wire import sampling_to_proto

if TYPE_CHECKING:
    from shared.sampling import SamplingParams

logger = logging.getLogger(__name__)

# Statuses that another attempt cannot fix: the drafter does not serve this session.
PERMANENT_CODES = frozenset(
    {
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)

# NOTE: gRPC's default reconnect backoff grows to 120 s; a restarted drafter must be
# reachable again within about one retry interval.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def make_channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """Channel to the drafter pool (mTLS when internal credentials are configured)."""
    return tls.channel(address, credentials, options=CHANNEL_OPTIONS)


def reopen_delay_s(failures_in_row: int, interval_s: float) -> float:
    """Seconds before reopening a failed Draft stream: tenacity's full-jitter exponential
    backoff, between 0 and min(8 x interval, interval x 2^(n-1))."""
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
    state.attempt_number = failures_in_row
    return tenacity.wait_random_exponential(multiplier=interval_s / 2, max=8 * interval_s)(state)


class StreamBroken(Exception):
    """The Draft stream ended (drafter down, rejected the session, or sent an error)."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(f"{code.name if code else 'CLOSED'}: {details}")
        self.code = code
        self.details = details


@dataclass(slots=True)
class _End:
    error: StreamBroken


class _DraftStream:
    """One Draft call: a request queue in, a response queue out (reader thread)."""

    def __init__(self, stub: drafter_pb2_grpc.DrafterServiceStub, open_msg: drafter_pb2.Open) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self.responses: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put(drafter_pb2.DraftRequest(open=open_msg))
        self._call = stub.Draft(self._request_iter(), wait_for_ready=False)
        self._reader = threading.Thread(target=self._read, name="draft-stream-reader", daemon=True)
        self._reader.start()

    def _request_iter(self):
        while True:
            msg = self._requests.get()
            if msg is None:
                return  # half-close
            yield msg

    def _read(self) -> None:
        try:
            for resp in self._call:
                self.responses.put(resp)
            self.responses.put(_End(StreamBroken(None, "the drafter ended the stream")))
        except grpc.RpcError as e:
            self.responses.put(_End(StreamBroken(e.code(), e.details() or "")))
        except Exception as e:  # noqa: BLE001 - never let the reader die silently
            self.responses.put(_End(StreamBroken(grpc.StatusCode.INTERNAL, repr(e))))

    def send(self, msg: drafter_pb2.DraftRequest) -> None:
        self._requests.put(msg)

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()


class RemoteProposerFactory:
    """Sessions of one method on one drafter pool (shares the channel between sessions)."""

    def __init__(
        self,
        address: str,
        target: str,
        tokenizer_hash: str,
        method: str,
        *,
        drafter: str = "",
        timeout_s: float = 0.05,
        catch_up_tokens: int = 16,
        catch_up_timeout_s: float = 1.0,
        run_ahead_wait_s: float = 0.0,
        retry_interval_s: float = 1.0,
        max_consecutive_timeouts: int = 3,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.address = address
        self.target = target
        self.tokenizer_hash = tokenizer_hash
        self.method = method
        self.drafter = drafter
        self.timeout_s = timeout_s
        self.catch_up_tokens = catch_up_tokens
        self.catch_up_timeout_s = catch_up_timeout_s
        self.run_ahead_wait_s = run_ahead_wait_s
        self.retry_interval_s = retry_interval_s
        self.max_consecutive_timeouts = max_consecutive_timeouts
        self._owns_channel = channel is None
        self.channel = channel if channel is not None else make_channel(address)
        self.stub = drafter_pb2_grpc.DrafterServiceStub(self.channel)
        # The last rejection no retry can fix (None: the pool serves this method).
        self.rejected: StreamBroken | None = None

    @property
    def available(self) -> bool:
        return self.rejected is None

    def new_session(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> RemoteProposer:
        if self.method in RUN_AHEAD_METHODS:
            return RunAheadProposer(self, prompt_ids, sampling)
        return RemoteProposer(self, prompt_ids, sampling)

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()


class RemoteProposer:
    """One session's Draft stream; a `Proposer` that degrades to empty drafts on failure."""

    def __init__(
        self, factory: RemoteProposerFactory, prompt_ids: Sequence[int], sampling: SamplingParams
    ) -> None:
        self.factory = factory
        self.sampling = sampling
        self.timeout_s = factory.timeout_s
        self._stream: _DraftStream | None = None
        self._epoch = 0
        self._drafter_context: list[int] = []  # what the drafter's session holds
        self._retry_at = 0.0
        self._num_failures_in_row = 0
        self._permanent = False
        self._consecutive_timeouts = 0
        self._closed = False
        self._asked: tuple[int, int, int] | None = None  # (epoch, context length, k) to collect
        self.catching_up = False  # the last `request` only brought the drafter up to date
        self._catch_up: tuple[int, float] | None = None  # (epoch, deadline) of that Commit's reply
        self.degraded = False
        self.drafter_name = ""
        # Counters (per session; tests and logs).
        self.num_proposals = 0
        self.num_timeouts = 0
        self.num_stale_dropped = 0
        self._compute_s = 0.0  # reported by Candidates not yet taken (`take_compute_s`)
        self.num_failures = 0
        self.num_reopens = 0
        # set_params: what the policy wants, and what the current stream already has (the
        # drafter keeps Commit.params sticky per stream; a reopened stream starts empty).
        self._params: dict[str, float] = {}
        self._sent_params: dict[str, float] = {}
        # NOTE: no stream yet: it opens with the first request for k > 0 tokens. A session
        # the load-aware policy keeps plain then costs the pool nothing; opening at session
        # start made the pool prefill every prompt on cores the target's batch needed
        # (`sorted` at 8 rows, the arms plain: 0.88x `none`, lazily 1.0x)

    # ---------------------------------------------------------------- stream lifecycle

    def _open(self, context: list[int]) -> None:
        # NOTE: Open is sent without waiting for Opened; the first Candidates confirm it.
        f = self.factory
        open_msg = drafter_pb2.Open(
            protocol_version=PROTOCOL_VERSION,
            target=f.target,
            tokenizer_hash=f.tokenizer_hash,
            token_ids=context,
            method=f.method,
            sampling=sampling_to_proto(self.sampling),
            drafter=f.drafter,
        )
        try:
            self._stream = _DraftStream(f.stub, open_msg)
        except Exception as e:  # noqa: BLE001 - e.g. the channel was closed
            self._fail(StreamBroken(grpc.StatusCode.UNAVAILABLE, repr(e)))
            return
        self._drafter_context = context
        self._epoch = 0
        self._catch_up = None
        self._sent_params = {}

    def _fail(self, err: StreamBroken) -> None:
        """Drop the stream; retry later unless the drafter refused this session for good."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._catch_up = None
        self.num_failures += 1
        if not self.degraded:
            logger.warning(
                "drafter %s (%s) failed for target %s: %s; decoding with k = 0 until it is back",
                self.factory.address, self.factory.method, self.factory.target, err,
            )
        self.degraded = True
        if err.code in PERMANENT_CODES:
            self._permanent = True
            self.factory.rejected = err
        else:
            # NOTE: jittered and growing with each failure in a row (capped): sessions that
            # lost one drafter together must not reopen on it together
            self._num_failures_in_row += 1
            self._retry_at = time.monotonic() + reopen_delay_s(
                self._num_failures_in_row, self.factory.retry_interval_s
            )

    # ---------------------------------------------------------------- Proposer

    def propose(self, context_ids: Sequence[int], k: int) -> Draft:
        self._request(context_ids, k, catch_up=False)
        return self.collect(time.monotonic() + self.timeout_s)

    def request(self, context_ids: Sequence[int], k: int) -> None:
        """Send the Commit of a new epoch (k tokens after `context_ids`); never waits. Sets
        `catching_up` where the drafter was far behind (nothing to collect this round)."""
        self._request(context_ids, k, catch_up=True)

    def _request(self, context_ids: Sequence[int], k: int, *, catch_up: bool) -> None:
        self._asked = None
        self.catching_up = False
        if k <= 0 or self._closed:
            return
        if self._catch_up is not None:
            if catch_up and not self._caught_up():
                self.catching_up = True  # its Commit is still being prefilled: ask nothing more
                return
            self._catch_up = None  # (`propose` waits for its own Commit, queued behind it)
        context = context_ids if isinstance(context_ids, list) else list(context_ids)
        fresh = self._stream is None
        if not self._ensure_stream(context):
            return
        behind = len(context) - (0 if fresh else common_prefix_len(self._drafter_context, context))
        self._send_commit(context, k)
        if catch_up and behind > self.factory.catch_up_tokens:
            self._catch_up = (self._epoch, time.monotonic() + self.factory.catch_up_timeout_s)
            self.catching_up = True
        else:
            self._asked = (self._epoch, len(context), k)

    def _caught_up(self) -> bool:
        """Has the catch-up Commit's reply arrived (or its time run out)? Never waits."""
        epoch, deadline = self._catch_up
        if self._stream is None:
            self._catch_up = None
            return True
        try:
            arrived = self._wait(self._stream, epoch, 0.0) is not None
        except StreamBroken as err:
            self._fail(err)  # the stream is gone: a retry reopens it
            return True
        if arrived:
            self._answered()
        elif time.monotonic() < deadline:
            return False
        else:
            self._timed_out()
        self._catch_up = None
        return True

    def _ensure_stream(self, context: list[int]) -> bool:
        """Is a stream open (reopened with `context` as the prompt once a retry is due)?"""
        if self._stream is None:
            if self._permanent or time.monotonic() < self._retry_at:
                return False
            self.num_reopens += self.num_failures > 0  # the first open is no reopen
            self._open(list(context))
        return self._stream is not None

    def _send_commit(self, context: list[int], k: int) -> None:
        keep = common_prefix_len(self._drafter_context, context)
        self._epoch += 1
        changed = {
            key: value for key, value in self._params.items() if self._sent_params.get(key) != value
        }
        self._stream.send(
            drafter_pb2.DraftRequest(
                commit=drafter_pb2.Commit(
                    epoch=self._epoch,
                    accepted_length=keep,
                    token_ids=context[keep:],
                    num_speculative_tokens=k,
                    params=changed,
                )
            )
        )
        self._sent_params.update(changed)
        del self._drafter_context[keep:]
        self._drafter_context.extend(context[keep:])
        self.num_proposals += 1

    def collect(self, deadline: float) -> Draft:
        """The Candidates of the last `request`, or an empty draft at `deadline`."""
        asked, self._asked = self._asked, None
        if asked is None or self._stream is None:
            return Draft(token_ids=[])
        epoch, context_len, k = asked
        try:
            cand = self._wait(self._stream, epoch, deadline)
        except StreamBroken as err:
            self._fail(err)
            return Draft(token_ids=[])
        if cand is None:
            self._timed_out()
            return Draft(token_ids=[])
        self._answered()
        return self._decode(cand, context_len, k)

    def _answered(self) -> None:
        """The drafter answered a Commit in time: it serves this session (again)."""
        self._consecutive_timeouts = 0
        self.factory.rejected = None
        if self.degraded:
            logger.info("drafter %s is back for target %s", self.factory.address, self.factory.target)
            self.degraded = False
            self._num_failures_in_row = 0

    def _timed_out(self) -> None:
        self.num_timeouts += 1
        self._consecutive_timeouts += 1
        if self._consecutive_timeouts >= self.factory.max_consecutive_timeouts:
            self._consecutive_timeouts = 0
            self._fail(StreamBroken(grpc.StatusCode.DEADLINE_EXCEEDED, "drafter too slow"))

    def _wait(
        self, stream: _DraftStream, epoch: int, deadline: float
    ) -> drafter_pb2.Candidates | None:
        """The Candidates of `epoch`, or None at the deadline; raises StreamBroken."""
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0:
                    resp = stream.responses.get(timeout=remaining)
                else:
                    resp = stream.responses.get_nowait()  # what already arrived still counts
            except queue.Empty:
                return None
            if isinstance(resp, _End):
                raise resp.error
            kind = resp.WhichOneof("response")
            if kind == "candidates":
                cand = resp.candidates
                self._compute_s += cand.compute_s
                if cand.epoch == epoch:
                    return cand
                if cand.epoch < epoch:
                    self.num_stale_dropped += 1
                    continue
                raise StreamBroken(grpc.StatusCode.INTERNAL, f"candidates for future epoch {cand.epoch}")
            if kind == "opened":
                self.drafter_name = resp.opened.drafter
                continue
            if kind == "error":
                raise StreamBroken(status_from_int(resp.error.code), resp.error.message)

    def _decode(self, cand: drafter_pb2.Candidates, context_len: int, k: int) -> Draft:
        if cand.start_position != context_len:
            logger.warning(
                "candidates start at %d, context has %d tokens: dropped", cand.start_position, context_len
            )
            return Draft(token_ids=[])
        # NOTE: Candidates.draft_probs (q) is not read: the verifier checks every draft
        # against the target's own token (one-hot q, shared.rejection)
        token_ids = list(cand.token_ids)
        info: dict[str, float] = {}
        exit_layers = None
        if cand.exit_layers:
            if len(cand.exit_layers) != len(token_ids):
                logger.warning(
                    "candidates with %d exit layers for %d tokens dropped",
                    len(cand.exit_layers), len(token_ids),
                )
                return Draft(token_ids=[])
            exit_layers = list(cand.exit_layers)
            info["mean_exit_layer"] = float(sum(exit_layers)) / len(exit_layers)
        if len(token_ids) > k:
            token_ids = token_ids[:k]
            exit_layers = exit_layers[:k] if exit_layers is not None else None
        return Draft(token_ids=token_ids, info=info, exit_layers=exit_layers)

    def take_compute_s(self) -> float:
        out, self._compute_s = self._compute_s, 0.0
        return out

    def update(self, num_accepted: int) -> None:
        pass  # the next Commit carries the accepted context itself

    def set_params(self, params: dict[str, float]) -> None:
        """Sticky drafter parameters: the changed keys ride on the next Commit (all of them
        again after a reopen)."""
        self._params.update(params)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            self._stream.close()
            self._stream = None




class RunAheadProposer(RemoteProposer):
    """A run-ahead (`card`) session: the drafter streams its line unasked
    (`shared.run_ahead`); a round commits the context and takes what the mirror of the line
    already holds after it, waiting at most `wait_s` for a first token (default 0: only
    what has arrived). The verifier thus never waits for the drafter, and the drafter never
    waits for the verifier while it is less than `ahead_limit(k)` ahead.

    A round for k = 0 (the policy stepped drafting aside) commits the context with k = 0
    once, which stops the run-ahead; the next round for k > 0 starts it again."""

    def __init__(
        self, factory: RemoteProposerFactory, prompt_ids: Sequence[int], sampling: SamplingParams
    ) -> None:
        self.wait_s = factory.run_ahead_wait_s
        self._tree = RunAheadTree()  # mirror of the drafter's tree
        self._pending: deque[tuple[int, int]] = deque()  # commits not yet applied: (epoch, context length)
        # the context of the last commit (the row's token list: it only ever grows, so an
        # earlier commit's context is a prefix of it) and how long it was then
        self._context: list[int] = []
        self._committed_len = 0
        self._k_sent = 0
        # Counters (per session; tests, logs, bench).
        self.num_rounds = 0  # rounds that asked for k > 0 tokens
        self.num_cached_rounds = 0  # ... and found at least one token in the line
        self.num_line_kept = 0  # commits the line extended (the target's bonus was the line's next token)
        self.num_alternative_commits = 0  # ... or that took an alternative of the mirror's tree
        self.num_branch_commits = 0  # ... and found the branch drafted under it
        self.num_commits = 0
        self.wait_s_total = 0.0
        self.max_wait_s = 0.0
        super().__init__(factory, prompt_ids, sampling)

    def counters(self) -> dict[str, float]:
        """For the request's stats (`SpecStats.drafter`)."""
        return {
            "rounds": self.num_rounds, "cached_rounds": self.num_cached_rounds, "commits": self.num_commits,
            "line_kept": self.num_line_kept, "alternative_commits": self.num_alternative_commits,
            "branch_commits": self.num_branch_commits, "wait_s": self.wait_s_total, "max_wait_s": self.max_wait_s,
        }  # fmt: skip

    def _open(self, context: list[int]) -> None:
        super()._open(context)
        # the drafter's session starts at the prompt (its epoch 0)
        self._tree.reset(context)
        self._context, self._k_sent = list(context), 0
        self._committed_len = len(context)
        self._pending.clear()

    def _request(self, context_ids: Sequence[int], k: int, *, catch_up: bool) -> None:
        # (a run-ahead catches up by itself: the verifier never waits for it)
        self._asked = None
        if self._closed or (k <= 0 and self._k_sent <= 0):
            return
        context = context_ids if isinstance(context_ids, list) else list(context_ids)
        if not self._ensure_stream(context):
            return
        if k != self._k_sent or len(context) != self._committed_len:
            try:
                self._drain(until=0.0)  # what arrived since the last round, without waiting
            except StreamBroken as err:
                self._fail(err)
                return
            if len(context) > self._committed_len:
                self.num_commits += 1
                kept = extends(self._tree.line, context)
                self.num_line_kept += kept
                took = not kept and self._took_alternative(context)
                self.num_alternative_commits += took
                # a branch hangs under an alternative: only a commit that took one can take it
                self.num_branch_commits += took and self._tree.branch_taken(context) is not None
            self._send_commit(context, max(k, 0))
            self._pending.append((self._epoch, len(context)))
            self._context, self._committed_len, self._k_sent = context, len(context), max(k, 0)
        if k > 0:
            self._asked = (self._epoch, len(context), k)

    def collect(self, deadline: float) -> Draft:
        """What the line holds after the context (up to k tokens), once at least one token
        is there or `wait_s` has passed; `deadline` (the loop's, for drafters that are asked
        per round) does not apply."""
        asked, self._asked = self._asked, None
        if asked is None or self._stream is None:
            return Draft(token_ids=[])
        _, context_len, k = asked
        start = time.monotonic()
        until = start + self.wait_s
        try:
            while True:
                self._drain(until)
                draft = self._cached(context_len, k)
                if draft.token_ids or time.monotonic() >= until:
                    break
        except StreamBroken as err:
            self._fail(err)
            draft = Draft(token_ids=[])
        waited = time.monotonic() - start
        self.num_rounds += 1
        self.num_cached_rounds += bool(draft.token_ids)
        self.wait_s_total += waited
        self.max_wait_s = max(self.max_wait_s, waited)
        return draft

    def _cached(self, context_len: int, k: int) -> Draft:
        """The best `k` nodes the mirror holds after the context (`RunAheadTree.select`).
        The mirror applies commits lazily, so where the context took a branch, the draft
        comes from a copy with the commit applied (the mirror itself must wait for the
        chunks the drafter grew before it saw the commit)."""
        context, tree = self._context[:context_len], self._tree
        if not extends(tree.line, context):
            if tree.branch_taken(context) is None:
                return Draft(token_ids=[])
            tree = tree.copy()
            tree.commit(context)
        chosen = tree.select(context_len, k)
        if is_chain(chosen.parents):
            return Draft(token_ids=chosen.token_ids)
        return Draft(token_ids=chosen.token_ids, tree_parents=chosen.parents)

    def _took_alternative(self, context: list[int]) -> bool:
        """Whether the round's accepted path went through an alternative of the mirror."""
        base = common_prefix_len(self._tree.line, context)
        return base < len(context) and self._tree.child(base, context[base])

    def _drain(self, until: float) -> None:
        """Apply every message that has arrived; if none has, wait for one until `until`."""
        stream = self._stream
        block = True
        while stream is not None:
            try:
                remaining = until - time.monotonic()
                if block and remaining > 0:
                    resp = stream.responses.get(timeout=remaining)
                else:
                    resp = stream.responses.get_nowait()
            except queue.Empty:
                return
            block = False
            if isinstance(resp, _End):
                raise resp.error
            kind = resp.WhichOneof("response")
            if kind == "candidates":
                self._compute_s += resp.candidates.compute_s
                self._apply(resp.candidates)
            elif kind == "opened":
                self.drafter_name = resp.opened.drafter
            elif kind == "error":
                raise StreamBroken(status_from_int(resp.error.code), resp.error.message)

    def _apply(self, cand: drafter_pb2.Candidates) -> None:
        """A chunk of the drafter's line as of commit `cand.epoch`: first apply our commits
        up to that epoch to the mirror (as the drafter did), then extend it."""
        while self._pending and self._pending[0][0] <= cand.epoch:
            _, length = self._pending.popleft()
            self._tree.commit(self._context[:length])
        n = len(cand.token_ids)
        parents = cand.tree_parents or range(-1, n - 1)
        if len(parents) != n or any(not -1 <= p < i for i, p in enumerate(parents)):
            self.num_stale_dropped += 1
            logger.warning("malformed run-ahead tree dropped")
            return
        if not self._tree.extend(cand.start_position, cand.token_ids, parents, cand.node_probs):
            self.num_stale_dropped += 1  # cannot happen with an in-order stream; never trusted
            logger.debug("run-ahead chunk at %d, line has %d tokens: dropped", cand.start_position, len(self._tree.line))
