"""`VerifierService`: runs the speculative loop of one target for each request.

`Generate` validates the request again (the router already did; a verifier may be called
directly), admits it (at most `max_sessions` at once, else RESOURCE_EXHAUSTED), picks the
proposer (none / ngram in process / model-based methods over `DrafterService.Draft`) and
steps `SpecDecodeLoop.generate` one round at a time in an executor thread, so sessions
interleave on one set of weights with no global lock and the event loop stays free for
streams, health checks and cancellation. A cancelled stream waits for its running round,
closes the generator (which closes the proposer: the drafter frees its session) and only
then leaves the active count.

Errors: validation and admission fail the RPC with their status before anything is
streamed; a failure mid-stream goes in-band as the `error` branch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
import torch

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
from shared.methods import IN_PROCESS_METHODS, MODEL_METHODS
from shared.ngram import NgramProposerFactory
from shared.pb.specdec.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from shared.serving import wait_shielded
from shared.types import FinishReason, GenerationChunk, GenerationRequest, GenerationResult
from shared.validation import check_lengths, check_message_size, check_options, check_prompt_ids
from shared.tls import internal_channel_credentials
from verifier_service.draft_client import RemoteProposerFactory, make_channel

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from shared.config import SpecdecConfig
    from shared.proposer import Proposer, ProposerFactory
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


# ---------------------------------------------------------------- producer thread

_DONE = object()


def _produce(
    gen: Iterator,
    proposer: Proposer | None,
    cancel: threading.Event,
    emit: Callable[[object], None],
) -> None:
    """Run the loop to its end in this executor thread, handing every item to `emit`.

    Rounds run back to back: the event loop writes chunk n while round n + 1 computes, so
    no thread hop or stream write sits between two target forwards. `cancel` stops it
    after the current round; the generator and the proposer are always closed here, in
    the thread that ran them (inference_mode is thread-local).
    """
    try:
        with torch.inference_mode():
            for item in gen:
                emit(item)
                if cancel.is_set():
                    break
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, in-band
        emit(e)
    finally:
        try:
            with torch.inference_mode():
                gen.close()
        finally:
            if proposer is not None:
                proposer.close()
    emit(_DONE)


class VerifierServicer(verifier_pb2_grpc.VerifierServiceServicer):
    """One target's verifier replica. `attach()` (or `load()`) makes it ready."""

    def __init__(
        self,
        config: SpecdecConfig,
        target: str,
        *,
        drafter_address: str | None = None,
        max_sessions: int | None = None,
    ) -> None:
        self.config = config
        self.target = config.target(target)
        self.max_sessions = max_sessions or config.max_sessions_per_replica
        self.drafter_address = drafter_address
        self.spec_loop: SpecDecodeLoop | None = None
        self.tokenizer_hash = ""
        self.executor = ThreadPoolExecutor(max_workers=self.max_sessions, thread_name_prefix="verifier")
        self.ngram = NgramProposerFactory(config.ngram)
        self.remote: dict[str, RemoteProposerFactory] = {}
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()
        self.active_sessions = 0
        self.peak_active_sessions = 0

    # ---------------------------------------------------------------- setup

    def load(self) -> None:
        """Load the target (slow: run it off the event loop) and attach it."""
        from shared.loading import tokenizer_hash
        from verifier_service.engine import load_target
        from verifier_service.loop import SpecDecodeLoop
        from verifier_service.policy import RulePolicy

        engine, tokenizer = load_target(self.target)
        policy = RulePolicy(self.config.speculation_for(self.target.name))
        self.attach(SpecDecodeLoop(engine, tokenizer, policy), tokenizer_hash(self.target.model_dir))

    def attach(self, spec_loop: SpecDecodeLoop, tokenizer_hash: str) -> None:
        """Serve with an already loaded loop; connect the model-based methods' drafter."""
        self.tokenizer_hash = tokenizer_hash
        if self.drafter_address:
            self._channel = make_channel(self.drafter_address, internal_channel_credentials(self.config.tls))
            kinds = {d.kind for d in self.config.drafters} & set(MODEL_METHODS)
            for method in sorted(kinds):
                self.remote[method] = RemoteProposerFactory(
                    self.drafter_address,
                    self.target.name,
                    tokenizer_hash,
                    method,
                    timeout_s=self.config.speculation.draft_timeout_s,
                    channel=self._channel,
                )
        self.spec_loop = spec_loop

    @property
    def ready(self) -> bool:
        return self.spec_loop is not None

    @property
    def methods(self) -> list[str]:
        """Methods served right now: in process ones plus those the drafter has not refused."""
        return [*IN_PROCESS_METHODS, *(m for m, f in self.remote.items() if f.available)]

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self._channel is not None:
            self._channel.close()

    # ---------------------------------------------------------------- validation

    def build_request(self, msg: verifier_pb2.VerifierGenerateRequest) -> GenerationRequest:
        """The loop's request, or the domain error naming the field at fault."""
        if self.spec_loop is None:
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
        )

    def proposer_factory(self, method: str) -> ProposerFactory | None:
        if method == "none":
            return None
        if method == "ngram":
            return self.ngram
        factory = self.remote.get(method)
        if factory is None:
            logger.warning(
                "method %r needs a drafter %s; decoding without speculation",
                method, "that serves it" if self.drafter_address else "address (--drafter)",
            )
        return factory

    # ---------------------------------------------------------------- RPCs

    async def GetLoad(self, request, context) -> verifier_pb2.GetLoadResponse:
        return verifier_pb2.GetLoadResponse(
            model=self.target.name,
            active_sessions=self.active_sessions,
            max_sessions=self.max_sessions,
            methods=self.methods if self.ready else [],
        )

    async def Generate(self, request: verifier_pb2.VerifierGenerateRequest, context) -> None:
        try:
            gen_request = self.build_request(request)
            self._admit()
        except SpecdecError as e:
            await _abort(context, e)
            return
        try:
            await self._generate(gen_request, context)
        finally:
            self._leave()

    def _admit(self) -> None:
        with self._lock:
            if self.active_sessions >= self.max_sessions:
                raise ResourceExhaustedError(
                    f"verifier of {self.target.name!r} is at capacity ({self.max_sessions} sessions)"
                )
            self.active_sessions += 1
            self.peak_active_sessions = max(self.peak_active_sessions, self.active_sessions)
        metrics.NUM_ACTIVE_SESSIONS.labels("verifier", self.target.name).inc()

    def _leave(self) -> None:
        with self._lock:
            self.active_sessions -= 1
        metrics.NUM_ACTIVE_SESSIONS.labels("verifier", self.target.name).dec()

    async def _generate(self, request: GenerationRequest, context) -> None:
        factory = self.proposer_factory(request.method)
        proposer = factory.new_session(request.prompt_ids, request.sampling) if factory else None
        gen = self.spec_loop.generate(request, proposer)
        recorder = metrics.TokenLatencyRecorder("verifier", self.target.name)
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: object) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody to tell
                cancel.set()

        producer = loop.run_in_executor(self.executor, _produce, gen, proposer, cancel, emit)
        finish = "abort"
        try:
            while True:
                item = await items.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _DONE:
                    raise RuntimeError("the loop ended without a result")
                if isinstance(item, GenerationChunk):
                    await context.write(chunk_to_proto(item))
                    recorder.on_tokens(len(item.token_ids))
                else:
                    await context.write(result_to_proto(item))
                    finish = item.finish_reason.value
                    metrics.observe_request(self.target.name, request.method, item.stats)
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
            cancel.set()
            # a cancelled stream's round may still run; the session is freed only when it
            # ends, so the caller leaves the active count after this
            await wait_shielded(producer, logger, "cleanup of a generation")


async def _abort(context, err: SpecdecError) -> None:
    metadata = [(FIELD_METADATA, err.field or "")]
    if isinstance(err, ResourceExhaustedError):
        # NOTE: tells the router "full, try again": a transport RESOURCE_EXHAUSTED (message
        # too large) carries no such mark and is never retried
        metadata.append((CAPACITY_METADATA, "1"))
    await context.abort(err.code, err.message, trailing_metadata=tuple(metadata))
