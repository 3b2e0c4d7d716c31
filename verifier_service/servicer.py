"""`VerifierService`: one target's replica, serving every request through its scheduler.

`Generate` validates the request again (the router already did; a verifier may be called
directly), submits it to the replica's `Scheduler` (one step loop over a batch of rows, a
bounded queue in front: RESOURCE_EXHAUSTED when the queue is full, DEADLINE_EXCEEDED after
`queue_timeout_s` in it), picks the proposer (none / ngram in process / model-based methods
over `DrafterService.Draft`) and streams what the step thread hands over. A cancelled
stream cancels its ticket: a queued request leaves the queue at once, a running one leaves
the batch at the next step (its drafter session is closed there).

Errors: validation and admission fail the RPC with their status before anything is
streamed (a queue timeout too); a failure mid-stream goes in-band as the `error` branch.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from shared import metrics
from shared.errors import (
    NotFoundError,
    ResourceExhaustedError,
    SpecdecError,
    UnavailableError,
    CAPACITY_METADATA,
    FIELD_METADATA,
    status_to_int,
)
from shared.draft_cache import CachedProposerFactory, DraftCache
from shared.methods import IN_PROCESS_METHODS, RUN_AHEAD_METHODS
from shared.ngram import NgramProposerFactory
from shared.ngram_table import SharedNgramTable
from shared.registry import Heartbeat
from shared.store import StoreRunner, make_store
from shared.pb.specdec.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from shared.types import FinishReason, GenerationChunk, GenerationRequest, GenerationResult
from shared.validation import check_lengths, check_message_size, check_options, check_prompt_ids
from shared.tls import internal_channel_credentials
from verifier_service.draft_client import RemoteProposerFactory, make_channel
from verifier_service.policy_stats import PolicyStats
from verifier_service.scheduler import Scheduler

if TYPE_CHECKING:
    from shared.config import SpecdecConfig
    from shared.proposer import ProposerFactory
    from shared.types import SpecStats
    from verifier_service.loop import SpecDecodeLoop

logger = logging.getLogger(__name__)


_FINISH_REASONS = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
}


# ---------------------------------------------------------------- proto conversion


def stats_to_proto(stats: SpecStats) -> common_pb2.SpecStats:
    return common_pb2.SpecStats(
        num_rounds=stats.num_rounds,
        num_draft_tokens=stats.num_draft_tokens,
        num_accepted_tokens=stats.num_accepted_tokens,
        mean_acceptance_length=stats.mean_acceptance_length,
        num_spec_rounds=stats.num_spec_rounds,
        num_accepted_tokens_per_pos=stats.num_accepted_per_pos,
        target_time_s=stats.target_time_s,
        draft_time_s=stats.draft_time_s,
        other_time_s=stats.other_time_s,
        policy=stats.policy,
        drafter=stats.drafter,
    )


def result_to_proto(result: GenerationResult) -> common_pb2.GenerateResponse:
    return common_pb2.GenerateResponse(
        complete=common_pb2.GenerateComplete(
            finish_reason=_FINISH_REASONS[result.finish_reason],
            usage=common_pb2.Usage(
                prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens
            ),
            stats=stats_to_proto(result.stats),
            token_ids=result.token_ids,
            text=result.text,
        )
    )


def chunk_to_proto(chunk: GenerationChunk) -> common_pb2.GenerateResponse:
    return common_pb2.GenerateResponse(
        chunk=common_pb2.GenerateChunk(token_ids=chunk.token_ids, text=chunk.text)
    )


def error_to_proto(err: SpecdecError) -> common_pb2.GenerateResponse:
    return common_pb2.GenerateResponse(
        error=common_pb2.Error(code=status_to_int(err.code), message=err.message, field=err.field or "")
    )


class VerifierServicer(verifier_pb2_grpc.VerifierServiceServicer):
    """One target's verifier replica. `attach()` (or `load()`) makes it ready."""

    def __init__(
        self,
        config: SpecdecConfig,
        target: str,
        *,
        drafter_address: str | None = None,
        max_batch_rows: int | None = None,
        max_queued_requests: int | None = None,
    ) -> None:
        self.config = config
        self.target = config.target(target)
        self.max_batch_rows = max_batch_rows or self.target.max_batch_rows
        self.max_queued_requests = (
            self.target.max_queued_requests if max_queued_requests is None else max_queued_requests
        )
        self.drafter_address = drafter_address
        self.spec_loop: SpecDecodeLoop | None = None
        self.scheduler: Scheduler | None = None
        self.tokenizer_hash = ""
        self.ngram = NgramProposerFactory(config.ngram)
        self.store = StoreRunner(make_store(config.store))  # shared draft state (`shared.store`)
        self.draft_cache: DraftCache | None = None  # repeated prompts (`shared.draft_cache`), if enabled
        self._heartbeat: Heartbeat | None = None
        self.policy_stats: PolicyStats | None = None  # the policy's arms in the store
        self.remote: dict[str, RemoteProposerFactory] = {}
        self._channel: grpc.Channel | None = None

    # ---------------------------------------------------------------- setup

    def load(self) -> None:
        """Load the target (slow: run it off the event loop) and attach it."""
        from shared.loading import tokenizer_hash
        from verifier_service.engine import load_target
        from verifier_service.loop import SpecDecodeLoop
        from verifier_service.policy import RulePolicy

        engine, tokenizer = load_target(self.target, self.max_batch_rows)
        policy = RulePolicy(self.config.speculation_for(self.target.name))
        loop = SpecDecodeLoop(engine, tokenizer, policy, max_step_tokens=self.target.max_step_tokens,
                              draft_wait_s=self.config.speculation.draft_timeout_s, target=self.target.name)  # fmt: skip
        self.attach(loop, tokenizer_hash(self.target.model_dir))

    def attach(self, spec_loop: SpecDecodeLoop, tokenizer_hash: str) -> None:
        """Serve with an already loaded loop (its engine's slots are the batch rows);
        connect the model-based methods' drafter."""
        self.tokenizer_hash = tokenizer_hash
        shared_ngram = self.config.store.shared_ngram
        if shared_ngram.enabled:
            table = SharedNgramTable(self.store, shared_ngram, tokenizer_hash, self.target.name,
                                     spec_loop.engine.vocab_size)  # fmt: skip
            self.ngram = NgramProposerFactory(self.config.ngram, table)
        if self.config.store.draft_cache.enabled:
            self.draft_cache = DraftCache(self.store, self.config.store.draft_cache, self.target.name,
                                          spec_loop.engine.vocab_size)  # fmt: skip
        if self.drafter_address:
            self.connect_drafter(self.drafter_address)
        self.max_batch_rows = spec_loop.engine.max_batch_rows
        spec_loop.target = self.target.name  # its metrics' label
        # before the step loop starts (it owns the arms after): warm arms from other replicas
        self.policy_stats = PolicyStats.attach(self.store, self.config, self.target.name, spec_loop.policy)
        self.spec_loop = spec_loop
        self.scheduler = Scheduler(spec_loop, max_queued_requests=self.max_queued_requests,
                                   queue_timeout_s=self.target.queue_timeout_s)  # fmt: skip

    def connect_drafter(self, address: str) -> None:
        """Draft through the pool at `address` from now on (at attach; on Ray, again when
        Serve replaced the pool's replica and its address changed). Running requests keep
        their sessions: a dead pool's streams have failed over to k = 0 already."""
        old = self._channel
        self.drafter_address = address
        self._channel = make_channel(address, internal_channel_credentials(self.config.tls))
        # every drafter kind as its own method, and the run-ahead methods over the pool's default
        methods = sorted({d.kind for d in self.config.drafters}) + list(RUN_AHEAD_METHODS)
        speculation = self.config.speculation_for(self.target.name).methods
        self.remote = {
            method: RemoteProposerFactory(
                address, self.target.name, self.tokenizer_hash, method,
                drafter=speculation[method].drafter if method in speculation else "",
                timeout_s=self.config.speculation.draft_timeout_s,
                catch_up_tokens=self.config.speculation.catch_up_tokens,
                run_ahead_wait_s=self.config.speculation.run_ahead_wait_s, channel=self._channel,
            )
            for method in methods
        }  # fmt: skip
        if old is not None:
            old.close()

    @property
    def drafter_channel(self) -> grpc.Channel | None:
        return self._channel

    @property
    def ready(self) -> bool:
        return self.scheduler is not None

    @property
    def active_sessions(self) -> int:
        """Requests running or queued."""
        return self.scheduler.num_running + self.scheduler.num_queued if self.scheduler else 0

    @property
    def methods(self) -> list[str]:
        """Methods served right now: in process ones plus those the drafter has not refused."""
        return [*IN_PROCESS_METHODS, *(m for m, f in self.remote.items() if f.available)]

    def register(self, address: str) -> None:
        """Announce this replica in the store's registry (`shared.registry`) until `close`."""

        async def start() -> Heartbeat:
            heartbeat = Heartbeat(self.store.store, "verifier", self.target.name, address)
            heartbeat.start()
            return heartbeat

        self._heartbeat = self.store.submit(start).result(5)

    def close(self) -> None:
        if self._heartbeat is not None:
            try:
                self.store.submit(self._heartbeat.stop).result(2)
            except Exception as e:  # noqa: BLE001 - the key expires anyway
                logger.debug("registry: %s", e)
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.policy_stats is not None:  # after the step loop stopped: its last measurements
            self.policy_stats.close()
        if self._channel is not None:
            self._channel.close()
        self.store.close()

    # ---------------------------------------------------------------- validation

    def build_request(self, msg: verifier_pb2.VerifierGenerateRequest) -> GenerationRequest:
        """The loop's request, or the domain error naming the field at fault."""
        if self.scheduler is None:
            raise UnavailableError(f"target {self.target.name!r} is still loading")
        if msg.model and msg.model != self.target.name:
            raise NotFoundError(
                f"model {msg.model!r} is not served by this verifier ({self.target.name!r})", field="model"
            )
        check_message_size(msg.ByteSize(), self.config.limits)
        engine = self.spec_loop.engine
        prompt = list(msg.prompt_token_ids)
        check_prompt_ids(prompt, engine.vocab_size)
        check_lengths(len(prompt), msg.max_new_tokens, limit=self.target.max_new_tokens,
                      max_context=engine.max_context, model=self.target.name)  # fmt: skip
        options = check_options(msg, msg.method or "none", limits=self.config.limits,
                                max_k=self.config.speculation.max_speculative_tokens)  # fmt: skip
        return GenerationRequest(
            prompt_ids=prompt,
            max_new_tokens=msg.max_new_tokens,
            sampling=options.sampling,
            stop=options.stop,
            method=options.method,
            num_speculative_tokens=options.num_speculative_tokens,
            request_id=msg.request_id,
            tenant=msg.tenant if self.config.store.isolate_tenants else "",
        )

    def proposer_factory(self, method: str, tenant: str = "") -> ProposerFactory | None:
        if method == "none":
            return None
        if method == "ngram":
            return self.ngram.for_tenant(tenant)
        factory = self.remote.get(method)
        if factory is None:
            logger.warning(
                "method %r needs a drafter %s; decoding without speculation",
                method, "that serves it" if self.drafter_address else "address (--drafter, or a pool in the registry)",
            )
        return factory

    # ---------------------------------------------------------------- RPCs

    async def GetLoad(self, request, context) -> verifier_pb2.GetLoadResponse:
        return verifier_pb2.GetLoadResponse(
            model=self.target.name,
            active_sessions=self.active_sessions,
            max_sessions=self.scheduler.capacity if self.scheduler else 0,
            methods=self.methods if self.ready else [],
        )

    async def Generate(self, request: verifier_pb2.VerifierGenerateRequest, context) -> None:
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()

        def sink(item: object) -> None:  # the step thread: never blocks
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody to tell
                pass

        try:
            gen_request = self.build_request(request)
            factory = self.proposer_factory(gen_request.method, gen_request.tenant)
            if factory is not None and self.draft_cache is not None:
                factory = CachedProposerFactory(factory, self.draft_cache.for_tenant(gen_request.tenant))
            ticket = self.scheduler.submit(gen_request, factory, sink)
        except SpecdecError as e:
            await _abort(context, e)
            return
        with metrics.track_session("verifier", self.target.name):
            try:
                await self._stream(gen_request, items, context)
            finally:
                self.scheduler.cancel(ticket)  # no-op once finished

    async def _stream(self, request: GenerationRequest, items: asyncio.Queue, context) -> None:
        recorder = metrics.TokenLatencyRecorder("verifier", self.target.name)  # TTFT counts queue time
        finish = "abort"
        started = False
        try:
            while True:
                item = await items.get()
                if isinstance(item, SpecdecError) and not started:
                    finish = "rejected"
                    await _abort(context, item)  # queue timeout or shutdown: a status, nothing streamed
                    return
                if isinstance(item, BaseException):
                    raise item
                started = True
                if isinstance(item, GenerationChunk):
                    await context.write(chunk_to_proto(item))
                    recorder.on_tokens(len(item.token_ids))
                else:
                    await context.write(result_to_proto(item))
                    finish = item.finish_reason.value
                    metrics.observe_request(self.target.name, request.method, item.stats)
                    # both queued, never awaited; the table learns from every method's output
                    if self.ngram.table is not None:
                        self.ngram.table.for_tenant(request.tenant).learn(request.prompt_ids, item.token_ids)
                    if self.draft_cache is not None:
                        self.draft_cache.for_tenant(request.tenant).record(request.prompt_ids, item.token_ids,
                                                                           request.sampling.greedy)  # fmt: skip
                    return
        except asyncio.CancelledError:
            logger.info("request %s cancelled", request.request_id or "-")
            raise
        except SpecdecError as e:
            finish = "error"
            await context.write(error_to_proto(e))
        except Exception:  # noqa: BLE001 - in-band, the stream already started
            finish = "error"
            logger.exception("request %s failed", request.request_id or "-")
            # NOTE: the exception text stays in the log; the client gets the request id
            await context.write(error_to_proto(SpecdecError(f"internal error (request {request.request_id or '-'})")))
        finally:
            recorder.finish(finish)


async def _abort(context, err: SpecdecError) -> None:
    metadata = [(FIELD_METADATA, err.field or "")]
    if isinstance(err, ResourceExhaustedError):
        # NOTE: tells the router "full, try again": a transport RESOURCE_EXHAUSTED (message
        # too large) carries no such mark and is never retried
        metadata.append((CAPACITY_METADATA, "1"))
    await context.abort(err.code, err.message, trailing_metadata=tuple(metadata))
