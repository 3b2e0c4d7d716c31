"""The speculative decoding loop over a batch of rows (one row = one request): continuous
batching, transport-free. The scheduler (`verifier_service.scheduler`) owns one loop per
replica and calls `add` and `step` from its thread; `generate` runs one request alone and
`run_together` several at once, in the caller's thread (in-process benchmarks and tests).

State of a row between steps: `tokens` = prompt + everything emitted; the row's slot of the
engine's KV cache holds all of them but the last (the *pending* token, fed next step). One
step:

    plans  = policy.plan(decoding rows, prefilling?)      # k per row, k = 0 allowed
    drafts = each row's proposer (remote ones all asked first, collected by one deadline)
    logits = engine.step([pending, *draft] per decoding row, a prompt chunk per prefilling row)
    y      = the target's own token at every verified position (argmax, or a draw from p
             with the (seed, position) noise: `shared.rejection`)
    per row: accept the draft's prefix that equals y, emit it + y after it, roll back the
             rest (a length), stream the tokens, finish on EOS / length / stop string
    policy.observe(rows, outcomes, step cost)   # reported when the next step starts

Prefill is chunked: decoding rows go first, prompt chunks fill the step's token budget
(`max_step_tokens`, at least one chunk per step), so a long prompt never stalls running
streams. A row whose remote draft is late runs with k = 0 that step (counted), so a slow
drafter never stalls the batch; nor is a drafter that must first catch up on the row's
context waited for (`PipelinedProposer.catching_up`): the row runs plain until it has.
Rows report through their `sink` (called in the loop's thread): a `GenerationChunk` per
step that emitted tokens, then a `GenerationResult`, or an exception; a cancelled row
leaves at the next step without a result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from shared import metrics
from shared.detokenize import IncrementalDetokenizer
from shared.draft_tree import accept_path, depths_of, is_chain
from shared.llama import RowFeed
from shared.proposer import EMPTY_DRAFT, CountingProposer, Draft, PipelinedProposer, Proposer
from shared.rejection import accept_prefix
from shared.sampling import sample_at, with_seed
from shared.stop import StopChecker
from shared.types import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    SpecStats,
)
from verifier_service.policy import RowOutcome, RowState, StepCost

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from verifier_service.engine import Engine
    from verifier_service.policy import SpeculationPolicy

logger = logging.getLogger(__name__)

Sink = Callable[[GenerationChunk | GenerationResult | BaseException], None]

DEFAULT_MAX_STEP_TOKENS = 512
DEFAULT_DRAFT_WAIT_S = 0.05


@dataclass(slots=True, eq=False)
class Row:
    """One request inside the loop."""

    request: GenerationRequest
    proposer: Proposer | None
    sink: Sink
    state: RowState  # the policy's
    slot: int
    sampling: SamplingParams  # the request's; sampled rows seeded (random seed if it had none)
    tokens: list[int]
    max_total: int  # prompt + generated tokens this row may reach
    detok: IncrementalDetokenizer
    stop: StopChecker
    stats: SpecStats = field(default_factory=SpecStats)
    text_parts: list[str] = field(default_factory=list)
    num_prefilled: int = 0  # prompt tokens in the cache; == len(prompt) once decoding
    cancelled: bool = False  # set from any thread; the row leaves at the next step
    draft: Draft = field(default_factory=lambda: EMPTY_DRAFT)  # this step's
    # the proposer is asked and collected separately (remote); decided once, not per step:
    # an isinstance check against a runtime-checkable Protocol costs 7 us
    pipelined: bool = False

    @property
    def decoding(self) -> bool:
        return self.num_prefilled == len(self.request.prompt_ids)


@dataclass(slots=True)
class TakenStep:
    """A step that decoded rows, reported to the policy when the next step starts (so its
    cost covers the loop's whole cycle)."""

    rows: list[RowState]  # the decoding rows'
    outcomes: list[RowOutcome]
    num_rows: int  # fed, prefilling ones included
    num_tokens: int  # fed
    started: float  # perf_counter()
    drafter_s: float  # drafter CPU seconds reported for its drafts
    stopped_drafter_s: float  # ... and by run-aheads it stopped
    stall_at_start: float | None  # cpu_stall_s()
    num_catching_up: int  # decoding rows that ran plain while their drafter caught up


class SpecDecodeLoop:
    def __init__(self, engine: Engine, tokenizer: PreTrainedTokenizerBase, policy: SpeculationPolicy,
                 *, max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS, draft_wait_s: float = DEFAULT_DRAFT_WAIT_S,
                 target: str = "") -> None:  # fmt: skip
        self.engine = engine
        self.tokenizer = tokenizer
        self.policy = policy
        self.max_step_tokens = max_step_tokens
        self.draft_wait_s = draft_wait_s
        self.target = target  # metrics label
        self.rows: list[Row] = []
        self.peak_rows = 0  # most rows one step fed (tests, logs)
        # the last step's outcomes, reported to the policy when the next step starts
        self._unobserved: TakenStep | None = None
        self._drafter_s = 0.0  # drafter CPU seconds reported for this step's drafts
        self._stopped_drafter_s = 0.0  # ... as a run-ahead stopped at this step, for drafts before it
        self._num_catching_up = 0  # this step's rows whose drafter is catching up (plain)

    # ---------------------------------------------------------------- rows in and out

    @property
    def num_free_slots(self) -> int:
        return self.engine.max_batch_rows - len(self.rows)

    def add(self, request: GenerationRequest, proposer: Proposer | None, sink: Sink) -> Row:
        """Start a request (its prefill runs in the next steps); needs a free slot."""
        slot = self.engine.allocate()
        if slot is None:
            raise RuntimeError("no free slot: the scheduler admits at most max_batch_rows rows")
        prompt = list(request.prompt_ids)
        row = Row(
            request=request, proposer=proposer, sink=sink, state=self.policy.start(request), slot=slot,
            sampling=with_seed(request.sampling), tokens=prompt,
            max_total=min(self.engine.max_context, len(prompt) + request.max_new_tokens),
            detok=IncrementalDetokenizer(self.tokenizer, prompt), stop=StopChecker(request.stop),
            pipelined=isinstance(proposer, PipelinedProposer),
        )  # fmt: skip
        self.rows.append(row)
        return row

    def _remove(self, row: Row) -> None:
        self.rows.remove(row)
        self.engine.release(row.slot)
        if row.proposer is not None:
            if isinstance(row.proposer, CountingProposer):
                row.stats.drafter = row.proposer.counters()
            try:
                row.proposer.close()
            except Exception:
                logger.exception("closing a proposer failed")
        row.stats.policy = self.policy.summary(row.state)

    def _fail(self, row: Row, err: BaseException) -> None:
        self._remove(row)
        row.sink(err)

    # ---------------------------------------------------------------- one step

    def step(self) -> None:
        """One target forward over every row (no-op without rows)."""
        t0, stall0 = time.perf_counter(), cpu_stall_s()
        self._observe(t0, stall0)
        for row in [r for r in self.rows if r.cancelled]:
            self._remove(row)
        if not self.rows:
            return
        decoding = [r for r in self.rows if r.decoding]
        self._draft(decoding)
        t_drafted = time.perf_counter()
        feeds, fed = self._feeds(decoding)
        t1 = time.perf_counter()
        try:
            logits = self.engine.step(feeds)  # [sum of num_logits, vocab]
            wanted = [(r, f) for r, f in zip(fed, feeds) if f.num_logits]
            y = sample_at(logits, [r.sampling for r, _ in wanted], [f.num_logits for _, f in wanted],
                          [len(r.tokens) for r, _ in wanted], _tree_offsets(feeds)).tolist()  # fmt: skip  # the step's one host sync
        except Exception as e:
            logger.exception("target step failed")
            for row in fed:
                self._fail(row, e)
            return
        t2 = time.perf_counter()
        step_s = t2 - t1
        self.peak_rows = max(self.peak_rows, len(feeds))
        metrics.BATCH_ROWS.labels(self.target).observe(len(feeds))
        metrics.STEP_TOKENS.labels(self.target).observe(sum(len(f.token_ids) for f in feeds))

        outcomes, observed = [], []
        offset = 0
        for i, (row, feed) in enumerate(zip(fed, feeds)):
            ys = y[offset : offset + feed.num_logits]
            offset += feed.num_logits
            try:
                if i < len(decoding):
                    outcomes.append(self._verify(row, feed, ys, step_s))
                    observed.append(row.state)
                else:  # a prompt chunk; the last one gives the first generated token
                    row.stats.target_time_s += step_s
                    if ys:
                        self._emit(row, ys)
            except Exception as e:
                logger.exception("request %s failed", row.request.request_id or "-")
                self._fail(row, e)
        t3 = time.perf_counter()
        if observed:
            self._unobserved = TakenStep(observed, outcomes, len(feeds), sum(len(f.token_ids) for f in feeds), t0,
                                         self._drafter_s, self._stopped_drafter_s, stall0,
                                         self._num_catching_up)  # fmt: skip
            self._drafter_s = self._stopped_drafter_s = 0.0
            if not self.rows:
                self._observe(t3, cpu_stall_s())
        overhead = (t1 - t_drafted) + (t3 - t2)  # drafting is in each row's draft_time_s
        for row in fed:
            row.stats.other_time_s += overhead / len(fed)

    def _observe(self, now: float, stall_now: float | None) -> None:
        """Report the last step to the policy, timed to `now` (CPU stall: `stall_now`)."""
        taken, self._unobserved = self._unobserved, None
        if taken is None:
            return
        stall0 = taken.stall_at_start
        stall_s = None if stall0 is None or stall_now is None else stall_now - stall0
        # NOTE: the loop's whole cycle, from this step's start to the next one's: drafting
        # is part of what a draft token costs where drafters share the machine (or are slow),
        # and a plain step pays the per-step bookkeeping and streaming (which contend with
        # the loop in this process) for fewer tokens
        cost = StepCost(taken.num_rows, taken.num_tokens, now - taken.started, taken.drafter_s,
                        taken.stopped_drafter_s, num_prefill_rows=taken.num_rows - len(taken.rows),
                        stall_s=stall_s, num_catching_up=taken.num_catching_up)  # fmt: skip
        self.policy.observe(taken.rows, taken.outcomes, cost)

    def _draft(self, rows: Sequence[Row]) -> None:
        """Each decoding row's draft for this step: in-process proposers run here, remote
        ones are all asked first and collected by one deadline; late = empty (k = 0)."""
        # (a step feeds at least one prompt chunk while any row is prefilling: `_feeds`)
        plans = self.policy.plan([r.state for r in rows], prefilling=len(rows) < len(self.rows))
        pending: list[tuple[Row, int]] = []
        self._num_catching_up = 0
        for row, plan in zip(rows, plans):
            row.draft = EMPTY_DRAFT
            # the verify forward writes len(tokens) + k positions; emitted tokens stop at max_total
            k = min(plan.k, row.max_total - len(row.tokens) - 1)
            if row.proposer is None:
                continue
            if k <= 0:
                if row.pipelined:
                    row.proposer.request(row.tokens, 0)  # a run-ahead drafter stops
                    self._stopped_drafter_s += row.proposer.take_compute_s()  # the policy charges it
                continue
            t = time.perf_counter()
            try:
                if plan.params is not None:
                    row.proposer.set_params(plan.params)
                if row.pipelined:
                    row.proposer.request(row.tokens, k)
                    if row.proposer.catching_up:
                        self._num_catching_up += 1
                        self._drafter_s += row.proposer.take_compute_s()
                    else:
                        pending.append((row, k))
                else:
                    row.draft = self._checked(row.proposer.propose(row.tokens, k), k)
            except Exception:
                logger.exception("proposer failed; this step runs with k = 0")
            row.stats.draft_time_s += time.perf_counter() - t
        if pending:
            t = time.perf_counter()
            deadline = time.monotonic() + self.draft_wait_s
            for row, k in pending:
                draft = row.proposer.collect(deadline)
                if not draft.token_ids:
                    metrics.LATE_DRAFTS.labels(self.target).inc()
                row.draft = self._checked(draft, k)
                self._drafter_s += row.proposer.take_compute_s()
            waited = time.perf_counter() - t
            for row, _ in pending:
                row.stats.draft_time_s += waited / len(pending)

    def _checked(self, draft: Draft, k: int) -> Draft:
        """The draft cut to k tokens, or empty when malformed (a faulty drafter costs
        speculation, never the request)."""
        ids = draft.token_ids
        if not ids:
            return EMPTY_DRAFT
        vocab = self.engine.vocab_size
        if not (0 <= min(ids) and max(ids) < vocab):
            logger.warning("malformed draft dropped (token ids outside [0, %d))", vocab)
            return EMPTY_DRAFT
        parents = draft.tree_parents
        if parents is not None:
            if len(parents) != len(ids) or any(not -1 <= p < i for i, p in enumerate(parents)):
                logger.warning("malformed draft tree dropped")
                return EMPTY_DRAFT
            if not self.engine.supports_trees or is_chain(parents):
                return self._checked(Draft(token_ids=draft.line_ids()), k)
            # nodes come parents first: the first k nodes are a tree
            return Draft(token_ids=ids[:k], tree_parents=parents[:k])
        if len(ids) <= k:
            return draft
        return Draft(token_ids=ids[:k], info=draft.info, exit_layers=draft.exit_layers and draft.exit_layers[:k])

    def _feeds(self, decoding: Sequence[Row]) -> tuple[list[RowFeed], list[Row]]:
        """Decoding rows first (pending token + draft), then prompt chunks within the budget."""
        feeds = [RowFeed(r.slot, [r.tokens[-1], *r.draft.token_ids], len(r.draft.token_ids) + 1,
                         _feed_parents(r.draft.tree_parents)) for r in decoding]  # fmt: skip
        fed = list(decoding)
        budget = self.max_step_tokens - sum(len(f.token_ids) for f in feeds)
        for row in self.rows:
            if row.decoding:
                continue
            if budget <= 0 and len(fed) > len(decoding):
                break  # at least one prompt chunk per step: prefill never starves
            prompt = row.request.prompt_ids
            n = min(len(prompt) - row.num_prefilled, max(budget, 16))
            chunk = prompt[row.num_prefilled : row.num_prefilled + n]
            row.num_prefilled += n
            feeds.append(RowFeed(row.slot, chunk, 1 if row.decoding else 0))
            fed.append(row)
            budget -= n
        return feeds, fed

    def _verify(self, row: Row, feed: RowFeed, ys: list[int], step_s: float) -> RowOutcome:
        draft_ids = feed.token_ids[1:]
        if row.draft.tree_parents is None:
            num_accepted = accept_prefix(draft_ids, ys)
            # the cache holds tokens + draft; keep tokens (the pending one included) + accepted
            self.engine.rollback(row.slot, len(row.tokens) + num_accepted)
            emitted = ys[: num_accepted + 1]
        else:
            path = accept_path(draft_ids, row.draft.tree_parents, ys)
            self.engine.keep_path(row.slot, len(row.tokens) - 1, [0, *(i + 1 for i in path)])
            num_accepted = len(path)
            emitted = [draft_ids[i] for i in path] + [ys[path[-1] + 1 if path else 0]]
        stats = row.stats
        stats.num_rounds += 1
        stats.target_time_s += step_s
        if draft_ids:
            stats.observe_round(len(draft_ids), num_accepted, row.draft.exit_layers)
            row.proposer.update(num_accepted)
        self._emit(row, emitted)
        return RowOutcome(len(draft_ids), num_accepted)

    def _emit(self, row: Row, emitted: list[int]) -> None:
        """Cut at EOS / max tokens, detokenize, stop strings; stream; finish when done."""
        eos_ids = self.engine.eos_token_ids
        hit_eos = False
        for i, tok in enumerate(emitted):
            if tok in eos_ids:
                emitted, hit_eos = emitted[: i + 1], True
                break
        room = row.max_total - len(row.tokens)
        if len(emitted) > room:
            emitted, hit_eos = emitted[:room], False
        done = hit_eos or len(emitted) == room
        finish = FinishReason.STOP if hit_eos else FinishReason.LENGTH
        row.tokens.extend(emitted)
        visible = [t for t in emitted if t not in eos_ids]
        text, stopped = row.stop.feed(row.detok.add(visible))
        if stopped:
            finish, done = FinishReason.STOP, True
        if done:
            text += "" if stopped else row.stop.flush()
        row.text_parts.append(text)
        row.sink(GenerationChunk(token_ids=emitted, text=text))
        if done:
            self._remove(row)
            num_prompt = len(row.request.prompt_ids)
            row.sink(GenerationResult(
                finish_reason=finish, prompt_tokens=num_prompt, completion_tokens=len(row.tokens) - num_prompt,
                token_ids=row.tokens[num_prompt:], text="".join(row.text_parts), stats=row.stats,
            ))  # fmt: skip

    # ---------------------------------------------------------------- in this thread

    def run_together(
        self, requests: Sequence[tuple[GenerationRequest, Proposer | None]]
    ) -> list[GenerationResult]:
        """Requests that join the loop at once, stepped in this thread until all have ended
        (in-process benchmarks and tests): their results, in order; a failed request
        raises its error."""
        last: dict[int, object] = {}  # a row's last item: its result, or its error
        for i, (request, proposer) in enumerate(requests):
            self.add(request, proposer, lambda item, i=i: last.__setitem__(i, item))
        with torch.inference_mode():
            while self.rows:
                self.step()
        results = [last[i] for i in range(len(requests))]
        for item in results:
            if isinstance(item, BaseException):
                raise item
        return results

    def generate(
        self, request: GenerationRequest, proposer: Proposer | None
    ) -> Iterator[GenerationChunk | GenerationResult]:
        """Run one request to its end in this thread (in-process benchmarks and tests);
        closing the iterator early cancels it."""
        items: list = []
        row = self.add(request, proposer, items.append)
        try:
            with torch.inference_mode():
                while True:
                    self.step()
                    for item in items:
                        if isinstance(item, BaseException):
                            raise item
                        yield item
                        if isinstance(item, GenerationResult):
                            return
                    items.clear()
        finally:
            if row in self.rows:
                self._remove(row)


def cpu_stall_s() -> float | None:
    """Seconds during which some task of the machine waited for a CPU, since boot (Linux
    pressure stall information, `/proc/pressure/cpu`); None where the kernel has none."""
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline()  # some avg10=... avg60=... avg300=... total=<microseconds>
    except OSError:
        return None
    return int(some.rsplit("total=", 1)[1]) / 1e6


def _feed_parents(draft_parents: list[int] | None) -> list[int] | None:
    """A draft tree's parents in its verify feed, after the pending token (the root, index 0)."""
    if draft_parents is None:
        return None
    return [-1, *(p + 1 for p in draft_parents)]


def _tree_offsets(feeds: Sequence[RowFeed]) -> list[int] | None:
    """Position offsets of the step's logits rows where a tree was fed (a node sits at the
    position of its depth), else None (rows are consecutive positions)."""
    if all(f.tree_parents is None for f in feeds):
        return None
    out: list[int] = []
    for f in feeds:
        if not f.num_logits:
            continue
        if f.tree_parents is None:
            out.extend(range(f.num_logits))
        else:  # a verify feed: every token's logits are wanted
            assert f.num_logits == len(f.token_ids)
            out.extend(d - 1 for d in depths_of(f.tree_parents))
    return out
