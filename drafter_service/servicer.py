"""`DrafterService.Draft`: one bidirectional stream per generation session.

    verifier -> drafter: Open, then Commit{epoch, accepted_length, token_ids, k} per round
    drafter -> verifier: Opened, then Candidates{epoch, start_position, token_ids, ...}

Commits and candidates cross in flight, so the stream has two halves: a reader task that
applies every Commit to the session's context as soon as it arrives (cheap list edits),
and the handler itself, which drafts for the *latest* commit only. A draft that finishes
after a newer Commit arrived is stale and dropped (latest wins): the verifier has moved
on and would drop it anyway. The session is freed when the stream ends for any reason.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import numpy as np

from drafter_service.pool import Branch, BranchKey, DraftResult, ProposeCall
from shared.draft_tree import Commit, RunAheadTree
from shared.errors import InvalidArgumentError, SpecdecError, UnavailableError
from shared.methods import RUN_AHEAD_METHODS
from shared.pb.specdec.v1 import drafter_pb2, drafter_pb2_grpc
from shared.protocol import PROTOCOL_VERSION
from shared.proposer import Draft
from shared.run_ahead import ahead_limit, branches_to_draft
from shared.serving import wait_shielded
from shared.wire import sampling_from_proto

if TYPE_CHECKING:
    from drafter_service.pool import DrafterPool, DraftSession

logger = logging.getLogger(__name__)


def num_accepted_since(
    draft_start: int, draft_ids: list[int], context: list[int]
) -> int:
    """How many of the last draft's tokens the new context kept at their positions."""
    n = 0
    for i, tok in enumerate(draft_ids):
        pos = draft_start + i
        if pos >= len(context) or context[pos] != tok:
            break
        n += 1
    return n


def candidates_message(
    epoch: int, start_position: int, draft: Draft, exit_layers: list[int] | None = None, compute_s: float = 0.0
) -> drafter_pb2.DraftResponse:
    cand = drafter_pb2.Candidates(
        epoch=epoch, start_position=start_position, token_ids=draft.token_ids, compute_s=compute_s
    )
    if draft.draft_probs is not None:
        q = draft.draft_probs.detach().float().cpu().numpy()  # [k, vocab_size]
        assert q.ndim == 2 and q.shape[0] == len(draft.token_ids), q.shape
        cand.draft_probs = np.ascontiguousarray(q, dtype="<f4").tobytes()
        cand.vocab_size = q.shape[1]
    if exit_layers:
        cand.exit_layers.extend(exit_layers[: len(draft.token_ids)])
    if draft.tree_parents is not None:
        cand.tree_parents.extend(draft.tree_parents)
        cand.node_probs.extend(draft.node_probs or ())
    return drafter_pb2.DraftResponse(candidates=cand)


MAX_DRAFT_TOKENS = 64  # per Commit; no policy asks for more
# Tokens per run-ahead propose: small, so the verifier sees the line grow soon after each
# commit; the pool batches the chunks of all sessions waiting at that moment.
RUN_AHEAD_CHUNK = 2


def _check_ids(ids, vocab_size: int, field: str) -> None:
    """Token ids from the verifier index the drafter's embedding: out of range is bad input
    (INVALID_ARGUMENT), never an IndexError deep in a forward (found by fuzzing)."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidArgumentError(f"token id {bad} outside [0, {vocab_size})", field=field)


@dataclass(slots=True)
class _StreamState:
    """What the reader half has applied; the drafting half reads it."""

    context: list[int]  # the verifier's accepted context (prompt + emitted tokens)
    vocab_size: int  # the drafter's: token ids must be in [0, vocab_size)
    epoch: int = 0  # latest Commit's epoch (0 = none yet)
    k: int = 0  # latest Commit's num_speculative_tokens
    params: dict[str, float] = field(default_factory=dict)
    ended: bool = False  # the verifier half-closed the stream
    error: BaseException | None = None  # a bad Commit: ends the stream with its status
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class DrafterServicer(drafter_pb2_grpc.DrafterServiceServicer):
    """Serves Draft streams from a `DrafterPool` (None until the models are loaded)."""

    def __init__(self, pool: DrafterPool | None = None) -> None:
        self.pool = pool
        self.num_stale_dropped = 0  # drafts dropped because a newer Commit arrived
        self.num_candidates_sent = 0

    async def Draft(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        # NOTE: read()/write() on the context, not the iterator/generator API, so that the
        # reader task and the drafting loop can run at the same time on one stream.
        session: DraftSession | None = None
        reader: asyncio.Task | None = None
        try:
            try:
                first = await context.read()
                session, state = await self._open(first)
            except SpecdecError as e:
                await context.abort(e.code, e.message)
                return
            await context.write(
                drafter_pb2.DraftResponse(
                    opened=drafter_pb2.Opened(drafter=session.drafter, protocol_version=PROTOCOL_VERSION)
                )
            )
            reader = asyncio.create_task(self._read_commits(context, state))
            loop = self._run_ahead_loop if first.open.method in RUN_AHEAD_METHODS else self._draft_loop
            try:
                await loop(context, session, state)
            except SpecdecError as e:  # e.g. Commit.params the proposer rejects
                state.error = e
            if state.error is not None:
                err = state.error
                code = err.code if isinstance(err, SpecdecError) else grpc.StatusCode.INTERNAL
                await context.abort(code, str(err))
        finally:
            if reader is not None:
                reader.cancel()
            if session is not None:
                await self._close(session)

    async def _open(self, first) -> tuple[DraftSession, _StreamState]:
        if self.pool is None:
            raise UnavailableError("drafter models are still loading")
        if first is grpc.aio.EOF or first.WhichOneof("request") != "open":
            raise InvalidArgumentError("the first message of a Draft stream must be Open", field="open")
        op = first.open
        sampling = sampling_from_proto(op.sampling)
        sampling.validate()
        prompt = list(op.token_ids)
        session = await self.pool.run(
            self.pool.open_session,
            op.target,
            op.tokenizer_hash,
            op.protocol_version,
            op.method,
            op.drafter,
            prompt,
            sampling,
        )
        vocab_size = self.pool.vocab_size(session.drafter)
        try:
            _check_ids(prompt, vocab_size, "token_ids")
        except InvalidArgumentError:
            await self.pool.run(session.close)
            raise
        return session, _StreamState(context=prompt, vocab_size=vocab_size)

    @staticmethod
    async def _read_commits(context: grpc.aio.ServicerContext, state: _StreamState) -> None:
        try:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    state.ended = True
                    return
                if msg.WhichOneof("request") != "commit":
                    raise InvalidArgumentError("only Commit may follow Open", field="commit")
                c = msg.commit
                if c.epoch <= state.epoch:
                    raise InvalidArgumentError(
                        f"commit epoch {c.epoch} does not increase (last {state.epoch})", field="epoch"
                    )
                if not 0 <= c.accepted_length <= len(state.context):
                    raise InvalidArgumentError(
                        f"accepted_length {c.accepted_length} outside [0, {len(state.context)}]",
                        field="accepted_length",
                    )
                _check_ids(c.token_ids, state.vocab_size, "token_ids")
                if not 0 <= c.num_speculative_tokens <= MAX_DRAFT_TOKENS:
                    raise InvalidArgumentError(
                        f"num_speculative_tokens {c.num_speculative_tokens} outside [0, {MAX_DRAFT_TOKENS}]",
                        field="num_speculative_tokens",
                    )
                del state.context[c.accepted_length :]
                state.context.extend(c.token_ids)
                state.epoch = c.epoch
                state.k = c.num_speculative_tokens
                if c.params:  # sticky: a Commit carries only the parameters that change
                    state.params = {**state.params, **c.params}
                state.wake.set()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - bad input or a broken stream ends it
            state.error = e
        finally:
            state.ended = True
            state.wake.set()

    async def _draft_loop(
        self, context: grpc.aio.ServicerContext, session: DraftSession, state: _StreamState
    ) -> None:
        pool = self.pool
        served_epoch = 0
        last_start, last_draft_ids = 0, []  # the last draft sent, for update(num_accepted)
        applied_params: dict[str, float] = {}
        owed_s = 0.0  # drafter CPU seconds not yet reported (`Candidates.compute_s`)
        while True:
            if state.epoch == served_epoch and not state.ended:
                await self._wait_commit(state)
            if state.ended:
                return
            epoch, k = state.epoch, state.k
            served_epoch = epoch
            if k <= 0:
                continue
            snapshot = list(state.context)  # the reader may edit the live list meanwhile
            num_accepted = (
                num_accepted_since(last_start, last_draft_ids, snapshot) if last_draft_ids else None
            )
            params = None
            if state.params != applied_params:
                params = applied_params = state.params
            result = await pool.propose(ProposeCall(session, snapshot, k, num_accepted, params))
            draft = result.draft
            owed_s += result.compute_s  # a dropped draft's compute rides on the next message
            if state.epoch != epoch:
                self.num_stale_dropped += 1
                continue
            if len(draft.token_ids) > k:
                draft.token_ids = draft.token_ids[:k]
                if draft.draft_probs is not None:
                    draft.draft_probs = draft.draft_probs[:k]
            last_start, last_draft_ids = len(snapshot), list(draft.token_ids)
            await context.write(candidates_message(epoch, len(snapshot), draft, result.exit_layers, owed_s))
            owed_s = 0.0
            self.num_candidates_sent += 1

    async def _run_ahead_loop(
        self, context: grpc.aio.ServicerContext, session: DraftSession, state: _StreamState
    ) -> None:
        """Method `card` (`shared.run_ahead`): keep the same `RunAheadTree` as the verifier's
        mirror. Each call extends the line by a chunk while it is less than
        `ahead_limit(k)` past the latest commit and drafts a branch under the likeliest
        alternatives that the round in flight may end in (`branches_to_draft`), all in one
        batched propose; every chunk and branch is streamed as it is drafted. Wait for a
        commit only when there is nothing left to draft or the verifier asked for 0 tokens."""
        pool = self.pool
        tree = RunAheadTree()
        epoch, base = -1, 0  # the commit the tree was last pruned to, its context length
        adopt: BranchKey | None = None  # a branch the tree took, until the pool hears of it
        applied_params: dict[str, float] = {}
        owed_s = 0.0  # drafter CPU seconds not yet reported (`Candidates.compute_s`)
        while not state.ended:
            if state.epoch != epoch:
                epoch, committed = state.epoch, list(state.context)
                taken = tree.branch_taken(committed)
                if tree.commit(committed) is Commit.BRANCHED:
                    adopt = taken
                base = len(committed)
            room = ahead_limit(state.k) - (len(tree.line) - base)
            branches = [
                Branch(key, tree.line[: key[0]] + [key[1]], session.run_ahead.branch_length)
                for key in branches_to_draft(tree, base, state.k, session.run_ahead.branches)
            ]
            if room <= 0 and not branches:
                await self._wait_commit(state)
                continue
            params = None
            if state.params != applied_params:
                params = applied_params = state.params
            n = min(RUN_AHEAD_CHUNK, max(room, 0))
            live = set(tree.branches) | {b.key for b in branches}
            call = ProposeCall(session, list(tree.line), n, None, params, branches, adopt, live)
            adopt = None
            result = await pool.propose(call)
            owed_s += result.compute_s
            sent = False
            for start, draft in self._tree_chunks(tree, result, branches):
                # the tree is extended as the verifier's mirror will be: chunk by chunk
                tree.extend(start, draft.token_ids, draft.tree_parents, draft.node_probs or ())
                await context.write(candidates_message(epoch, start, draft, compute_s=owed_s))
                owed_s, sent = 0.0, True
                self.num_candidates_sent += 1
            if not sent and state.epoch == epoch:  # nothing to add (the drafter's context is full)
                await self._wait_commit(state)

    @staticmethod
    def _tree_chunks(
        tree: RunAheadTree, result: DraftResult, branches: list[Branch]
    ) -> list[tuple[int, Draft]]:
        """A call's drafts as tree chunks (start position, nodes): the line's chunk (its
        tokens and their runner-ups), then each branch as a chain from its alternative."""
        chunks = []
        line = result.draft
        if line.token_ids:
            n = len(line.token_ids)
            parents = line.tree_parents or list(range(-1, n - 1))
            chunks.append((len(tree.line), Draft(line.token_ids, tree_parents=parents, node_probs=line.node_probs)))
        for b, draft in zip(branches, result.branch_drafts):
            ids = draft.line_ids()[: b.k]
            if not ids:
                continue
            position, alt = b.key
            q_alt = next(q for t, q in tree.alternatives[position] if t == alt)
            probs = (draft.node_probs or [1.0] * len(ids))[: len(ids)]
            chunks.append((position, Draft([alt, *ids], tree_parents=list(range(-1, len(ids))), node_probs=[q_alt, *probs])))
        return chunks

    @staticmethod
    async def _wait_commit(state: _StreamState) -> None:
        # A poll-free wait: the reader sets `wake` after each commit and at the end.
        state.wake.clear()
        await state.wake.wait()

    async def _close(self, session: DraftSession) -> None:
        # NOTE: shielded so that a cancelled stream still waits for its last propose to
        # finish (DraftSession's lock) and frees the session before the handler returns.
        fut = asyncio.ensure_future(self.pool.run(session.close))
        await wait_shielded(fut, logger, "closing a draft session")
