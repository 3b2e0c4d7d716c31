"""The router's core and its gRPC face: validation, placement, admission, relay.

`Router.generate(request, timeout=)` is the one code path behind both public faces
(`GenerationServicer` here, the OpenAI-compatible HTTP app in `router/http.py`):

    validate (router/validation.py) → acquire the least-loaded replica of the target
    (RESOURCE_EXHAUSTED when every replica is at `max_sessions`) → relay
    `VerifierService.Generate` → release the replica when the stream ends for any reason.

It is an async generator: validation and admission run at the first `__anext__`, so a
caller learns about bad input before it sends anything (HTTP status, gRPC status). After the
first message, failures go in-band as the `error` branch of `GenerateResponse`. Closing or
cancelling the generator cancels the upstream call, which ends the verifier's loop and its
drafter session. A deadline is forwarded as the upstream call's timeout.

Domain errors become gRPC statuses only in `GenerationServicer` (`SpecdecError.code`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import tenacity
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from router.auth import Gatekeeper
from router.placement import load_share, rank_by_load
from router.validation import ModelSpec, ValidatedRequest, validate_request
from shared import metrics
from shared.config import AuthConfig, RequestLimits, TlsConfig
from shared.errors import (
    CAPACITY_METADATA,
    FIELD_METADATA,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SpecdecError,
    UnavailableError,
    status_from_int,
    status_to_int,
)
from shared.methods import IN_PROCESS_METHODS, SPEC_METHODS
from shared.pb.specdec.v1 import (
    common_pb2,
    router_pb2,
    router_pb2_grpc,
    verifier_pb2,
    verifier_pb2_grpc,
)
from shared.serving import HealthReporter, grpc_server
from shared.tls import (
    add_port,
    aio_channel,
    internal_channel_credentials,
    public_server_credentials,
)

if TYPE_CHECKING:
    from shared.config import SpecdecConfig, TargetConfig

logger = logging.getLogger(__name__)

SERVICE = "router"  # `service` label of this process's metrics
GENERATION_SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
_UPSTREAM_RETRIES = 10  # upstream RESOURCE_EXHAUSTED retries before the first message (~1 s)
# a Serve deployment's replica died before the first message: retry on the deployment
# while Serve notices (actor death reaches the handles within about a second)
_DEPLOYMENT_RETRIES, _DEPLOYMENT_RETRY_S = 5, 1.0
_DRAIN_CALL_TIMEOUT_S = 5.0
DEFAULT_REPLICA_CAPACITY = 256  # a replica's rows + queue when the config does not say


# ---------------------------------------------------------------- errors from upstream


_HTTP_STATUS = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_ERROR_CLASSES: dict[grpc.StatusCode, type[SpecdecError]] = {
    cls.code: cls
    for cls in (
        DeadlineExceededError,
        InvalidArgumentError,
        NotFoundError,
        ResourceExhaustedError,
        UnavailableError,
        FailedPreconditionError,
    )
}


class UpstreamError(SpecdecError):
    """A verifier's status relayed as is (DEADLINE_EXCEEDED, INTERNAL, ...)."""

    def __init__(self, code: grpc.StatusCode, message: str, *, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.code = code
        self.http_status = _HTTP_STATUS.get(code, 500)
        self.openai_type = "server_error" if self.http_status >= 500 else "invalid_request_error"


def upstream_error(code: grpc.StatusCode, message: str, field: str | None = None) -> SpecdecError:
    cls = _ERROR_CLASSES.get(code)
    if cls is not None:
        return cls(message, field=field or None)
    return UpstreamError(code, message, field=field or None)


def http_status_of(code: int) -> int:
    """HTTP status for a numeric gRPC code (in-band `Error.code`)."""
    return _HTTP_STATUS.get(status_from_int(code), 500)


# ---------------------------------------------------------------- replicas


@dataclass(slots=True, eq=False)
class Replica:
    """One verifier process of a target, as the router sees it."""

    model: str
    address: str
    max_sessions: int
    stub: verifier_pb2_grpc.VerifierServiceStub  # or a `router.handles.HandleStub` (Ray Serve)
    channel: grpc.aio.Channel | None  # None: reached through a Serve handle
    active: int = 0  # sessions this router has in flight there
    healthy: bool = True
    methods: tuple[str, ...] = ()  # last GetLoad report


class ReplicaRegistry:
    """target → verifier replicas, with the router's own active-session counts.

    Only touched from the event loop thread, so no lock: `acquire` and `release` are
    synchronous and run between awaits.
    """

    def __init__(self, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.credentials = credentials  # mTLS to verifiers of the internal CA, when configured
        self._replicas: dict[str, list[Replica]] = {}
        self._next: dict[str, int] = {}  # round-robin start among equally loaded replicas

    def add(self, model: str, address: str, max_sessions: int) -> Replica:
        channel = aio_channel(address, self.credentials)
        replica = Replica(
            model=model,
            address=address,
            max_sessions=max_sessions,
            stub=verifier_pb2_grpc.VerifierServiceStub(channel),
            channel=channel,
        )
        self._replicas.setdefault(model, []).append(replica)
        return replica

    def add_stub(self, model: str, name: str, stub, max_sessions: int) -> Replica:
        """A replica reached through `stub` (a Serve deployment handle's `HandleStub`)."""
        replica = Replica(model=model, address=name, max_sessions=max_sessions, stub=stub, channel=None)
        self._replicas.setdefault(model, []).append(replica)
        return replica

    async def remove(self, model: str, address: str) -> None:
        replicas = self._replicas.get(model, [])
        for replica in [r for r in replicas if r.address == address]:
            replicas.remove(replica)
            if replica.channel is not None:
                await replica.channel.close()

    def replicas(self, model: str) -> list[Replica]:
        return list(self._replicas.get(model, []))

    def all(self) -> list[Replica]:
        return [r for rs in self._replicas.values() for r in rs]

    def acquire(self, model: str) -> Replica:
        """The least-loaded healthy replica with a free session slot (`router.placement`);
        counts the session."""
        healthy = [r for r in self._replicas.get(model, []) if r.healthy]
        if not healthy:
            raise UnavailableError(f"no healthy verifier replica for model {model!r}", field="model")
        start = self._next.get(model, 0) % len(healthy)
        rotated = healthy[start:] + healthy[:start]  # round robin among equally loaded replicas
        tiers = rank_by_load(rotated, lambda r: load_share(r.active, r.max_sessions))
        if not tiers:
            total = sum(r.max_sessions for r in healthy)
            raise ResourceExhaustedError(
                f"model {model!r} is at capacity ({total} requests running or queued on "
                f"{len(healthy)} replicas); retry later"
            )
        self._next[model] = start + 1
        best = tiers[0][0]
        best.active += 1
        return best

    def release(self, replica: Replica) -> None:
        assert replica.active > 0, replica
        replica.active -= 1

    async def close(self) -> None:
        for replica in self.all():
            if replica.channel is not None:
                await replica.channel.close()
        self._replicas.clear()


# ---------------------------------------------------------------- model info


def model_spec_from_config(target: TargetConfig, config: SpecdecConfig) -> ModelSpec:
    """What validation needs, read from the model directory (config.json; no torch)."""
    from shared.loading import tokenizer_hash

    with open(Path(target.model_dir) / "config.json") as f:
        hf = json.load(f)
    max_context = target.max_context or int(hf.get("max_position_embeddings", 2048))
    methods = [*IN_PROCESS_METHODS]
    for drafter in config.drafters:
        if drafter.kind not in methods:
            methods.append(drafter.kind)
    return ModelSpec(
        name=target.name,
        max_context=max_context,
        max_new_tokens=target.max_new_tokens,
        vocab_size=int(hf["vocab_size"]),
        methods=tuple(methods),
        tokenizer_hash=tokenizer_hash(target.model_dir),
        max_speculative_tokens=config.speculation.max_speculative_tokens,
    )


# ---------------------------------------------------------------- the router core


@dataclass(slots=True)
class _TargetState:
    config_spec: ModelSpec  # from config; methods as configured
    reported_methods: set[str] = field(default_factory=set)  # union of GetLoad reports

    @property
    def spec(self) -> ModelSpec:
        if not self.reported_methods:
            return self.config_spec
        ordered = tuple(m for m in SPEC_METHODS if m in self.reported_methods)
        return replace(self.config_spec, methods=ordered)


class Router:
    """Validation, placement, admission and relay for every served target."""

    def __init__(
        self,
        specs: Iterable[ModelSpec],
        tokenize: Callable[[str, str], list[int]],
        *,
        replica_capacity: dict[str, int] | None = None,
        limits: RequestLimits | None = None,
        auth: AuthConfig | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        self._targets = {s.name: _TargetState(config_spec=s) for s in specs}
        self._tokenize = tokenize
        self.limits = limits or RequestLimits()
        self.auth = auth or AuthConfig()
        self.gatekeeper = Gatekeeper.from_config(self.auth)
        # requests one verifier replica of a target takes at once (its rows + queue)
        self.replica_capacity = replica_capacity or {}
        self.tls = tls or TlsConfig()
        self.registry = ReplicaRegistry(internal_channel_credentials(self.tls))
        self.draining = False
        self.num_in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._poller: asyncio.Task | None = None
        for name in self._targets:
            metrics.NUM_ACTIVE_SESSIONS.labels(SERVICE, name).set(0)

    @classmethod
    def from_config(cls, config: SpecdecConfig) -> Router:
        """Specs from the config's targets; one tokenizer per distinct tokenizer."""
        from shared.loading import load_tokenizer

        specs = [model_spec_from_config(t, config) for t in config.targets]
        tokenizers_by_hash: dict[str, object] = {}
        tokenizers: dict[str, object] = {}
        for target, spec in zip(config.targets, specs):
            if spec.tokenizer_hash not in tokenizers_by_hash:
                tokenizers_by_hash[spec.tokenizer_hash] = load_tokenizer(target.model_dir)
            tokenizers[spec.name] = tokenizers_by_hash[spec.tokenizer_hash]

        def tokenize(model: str, text: str) -> list[int]:
            return list(tokenizers[model](text, add_special_tokens=False)["input_ids"])

        capacity = {t.name: t.replica_capacity for t in config.targets}
        return cls(specs, tokenize, replica_capacity=capacity, limits=config.limits, auth=config.auth,
                   tls=config.tls)  # fmt: skip

    # ------------------------------------------------------------ models and replicas

    @property
    def models(self) -> dict[str, ModelSpec]:
        return {name: state.spec for name, state in self._targets.items()}

    async def add_replica(self, model: str, address: str, max_sessions: int | None = None) -> Replica:
        if model not in self._targets:
            raise NotFoundError(f"model {model!r} is not configured", field="model")
        capacity = max_sessions or self.replica_capacity.get(model, DEFAULT_REPLICA_CAPACITY)
        replica = self.registry.add(model, address, capacity)
        await self._refresh(replica)
        logger.info("registered verifier %s for %s (methods %s)", address, model, replica.methods)
        return replica

    async def add_deployment(self, model: str, name: str, stub, max_sessions: int) -> Replica:
        """A verifier deployment reached through a Serve handle (`router.ray_app`): one
        logical replica; Serve spreads its requests over the deployment's replicas."""
        if model not in self._targets:
            raise NotFoundError(f"model {model!r} is not configured", field="model")
        replica = self.registry.add_stub(model, name, stub, max_sessions)
        await self._refresh(replica, timeout=30.0)
        logger.info("registered verifier deployment %s for %s (methods %s)", name, model, replica.methods)
        return replica

    async def _refresh(self, replica: Replica, timeout: float = 2.0) -> None:
        """GetLoad: health and the methods the replica serves (sticky union per target)."""
        try:
            load = await replica.stub.GetLoad(verifier_pb2.GetLoadRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                replica.healthy = True  # an older verifier: alive, no load report
                return
            if replica.healthy:
                logger.warning("verifier %s unhealthy: %s", replica.address, e.code().name)
            replica.healthy = False
            return
        if not replica.healthy:
            logger.info("verifier %s healthy again", replica.address)
        replica.healthy = True
        replica.methods = tuple(load.methods)
        if load.methods:
            self._targets[replica.model].reported_methods.update(load.methods)
            self._targets[replica.model].reported_methods.update(IN_PROCESS_METHODS)

    def start_polling(self, interval_s: float = 2.0) -> None:
        async def poll() -> None:
            while True:
                await asyncio.sleep(interval_s)
                await asyncio.gather(*(self._refresh(r) for r in self.registry.all()))

        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(poll())

    def list_models(self) -> router_pb2.ListModelsResponse:
        return router_pb2.ListModelsResponse(
            models=[
                router_pb2.ModelInfo(
                    name=spec.name,
                    max_context=spec.max_context,
                    max_new_tokens=spec.max_new_tokens,
                    methods=list(spec.methods),
                    tokenizer_hash=spec.tokenizer_hash,
                    num_replicas=sum(r.healthy for r in self.registry.replicas(spec.name)),
                )
                for spec in self.models.values()
            ]
        )

    # ------------------------------------------------------------ generation

    def validate(self, request: router_pb2.GenerateRequest) -> ValidatedRequest:
        return validate_request(request, self.models, self._tokenize, self.limits)

    async def generate(
        self, request: router_pb2.GenerateRequest, *, timeout: float | None = None, tenant: str = ""
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        """Validate, admit, relay (`tenant`: the caller's key id, `Gatekeeper.caller`).
        Raises `SpecdecError` before the first message only."""
        if self.draining:
            raise UnavailableError("the router is shutting down")
        # NOTE: tokenizing a long prompt takes milliseconds: off the event loop
        validated = await asyncio.get_running_loop().run_in_executor(None, self.validate, request)
        validated.tenant = tenant
        held = [self.registry.acquire(validated.model)]  # the replica this request counts on
        replica = held[0]
        self._enter()
        recorder = metrics.TokenLatencyRecorder(SERVICE, validated.model)
        finish = "abort"
        call: grpc.aio.UnaryStreamCall | None = None
        terminal = False  # saw `complete` or `error`: the verifier ends the call itself
        try:
            with metrics.track_session(SERVICE, validated.model):
                num_sent = 0
                try:
                    call, response = await self._open_with_failover(held, validated, timeout)
                    replica = held[0]
                    while response is not grpc.aio.EOF:
                        kind = response.WhichOneof("response")
                        if kind == "error" and num_sent == 0:
                            err = response.error
                            raise upstream_error(status_from_int(err.code), err.message, err.field)
                        if kind == "chunk":
                            recorder.on_tokens(len(response.chunk.token_ids))
                        elif kind == "complete":
                            reason = common_pb2.FinishReason.Name(response.complete.finish_reason)
                            finish = reason.removeprefix("FINISH_REASON_").lower()
                        else:
                            finish = "error"
                        terminal = kind != "chunk"
                        num_sent += 1
                        yield response
                        if terminal:
                            return
                        response = await call.read()
                except grpc.aio.AioRpcError as e:
                    message = _client_message(e, validated.model, validated.request_id)
                    logger.warning("request %s: verifier %s failed: %s %s", validated.request_id,
                                   held[0].address, e.code().name, e.details())  # fmt: skip
                    if num_sent == 0:
                        raise upstream_error(e.code(), message) from e
                    finish = "error"
                    yield _error_response(e.code(), message)
                    return
                # The stream ended without `complete`: the verifier went away mid-request.
                logger.warning("request %s: verifier %s ended the stream without a result",
                               validated.request_id, replica.address)  # fmt: skip
                message = f"the verifier of {validated.model!r} went away (request {validated.request_id})"
                if num_sent == 0:
                    raise UnavailableError(message)
                finish = "error"
                yield _error_response(grpc.StatusCode.UNAVAILABLE, message)
        finally:
            try:
                if call is not None and terminal:
                    # NOTE(router): hold the slot until the verifier's handler has returned
                    # (it leaves its own count after cleanup), so the router's admission
                    # does not run ahead of the verifier's. A consumer cancelled here (an
                    # HTTP client gone after [DONE]) skips the wait, never the release.
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(call.code(), _DRAIN_CALL_TIMEOUT_S)
            finally:
                # A client that cancelled (or a consumer that closed us) cancels upstream,
                # which ends the verifier's loop and its drafter session.
                if call is not None:
                    call.cancel()
                self.registry.release(held[0])
                recorder.finish(finish)
                self._exit()

    async def _open_with_failover(
        self, held: list[Replica], validated: ValidatedRequest, timeout: float | None
    ) -> tuple[grpc.aio.UnaryStreamCall, common_pb2.GenerateResponse | object]:
        """`_open` on `held[0]`; a replica that is UNAVAILABLE before answering (dead,
        restarting) is marked unhealthy and the request moves to another healthy replica of
        the target (`held[0]` is swapped, so the caller releases the right one). Nothing was
        streamed yet, so moving is invisible to the client."""
        message = validated.to_verifier()
        deployment_retries = _DEPLOYMENT_RETRIES
        while True:
            replica = held[0]
            try:
                return await self._open(replica, message, timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                if replica.channel is None and deployment_retries > 0:
                    # A Serve deployment routes every call anew: once Serve knows the
                    # replica died, the same deployment means a live replica, or a wait
                    # for the one Serve starts in its place
                    deployment_retries -= 1
                    logger.warning("request %s: a replica of %s unavailable (%s); retrying",
                                   validated.request_id, replica.address, e.details())  # fmt: skip
                    await asyncio.sleep(_DEPLOYMENT_RETRY_S)
                    continue
                replica.healthy = False  # the health poller brings it back once SERVING
                try:
                    other = self.registry.acquire(validated.model)
                except SpecdecError:
                    raise e from None
                logger.warning("request %s: verifier %s unavailable; failing over to %s",
                               validated.request_id, replica.address, other.address)  # fmt: skip
                self.registry.release(replica)
                held[0] = other

    async def _open(
        self,
        replica: Replica,
        message: verifier_pb2.VerifierGenerateRequest,
        timeout: float | None,
    ) -> tuple[grpc.aio.UnaryStreamCall, common_pb2.GenerateResponse | object]:
        """Start the verifier call and read its first message.

        The verifier's own session count lags the router's by its cleanup, so an upstream
        RESOURCE_EXHAUSTED before any message is retried briefly (within the deadline).
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(_replica_full),
            stop=tenacity.stop_after_attempt(_UPSTREAM_RETRIES + 1),
            # jittered, so requests refused together do not come back together
            wait=tenacity.wait_random_exponential(multiplier=0.01, max=0.2),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                remaining = None if deadline is None else max(deadline - loop.time(), 0.001)
                call = replica.stub.Generate(message, timeout=remaining)
                return call, await call.read()
        raise AssertionError("unreachable")

    def _enter(self) -> None:
        self.num_in_flight += 1
        self._idle.clear()

    def _exit(self) -> None:
        self.num_in_flight -= 1
        if self.num_in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """True once no request is in flight (draining), False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        await self.registry.close()


# Statuses whose details describe the client's own request (safe and useful to relay as
# is); any other upstream failure reaches the client without internal details (logged).
_CLIENT_FAULTS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED})  # fmt: skip


def _replica_full(e: BaseException) -> bool:
    """The verifier refused for capacity (its mark), not a transport RESOURCE_EXHAUSTED."""
    if not isinstance(e, grpc.aio.AioRpcError) or e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    return any(k == CAPACITY_METADATA for k, _ in (e.trailing_metadata() or ()))


def _client_message(e: grpc.aio.AioRpcError, model: str, request_id: str) -> str:
    if e.code() in _CLIENT_FAULTS:
        return e.details() or e.code().name
    return f"the verifier of {model!r} failed: {e.code().name.lower()} (request {request_id})"


def _error_response(code: grpc.StatusCode, message: str, field: str = "") -> common_pb2.GenerateResponse:
    return common_pb2.GenerateResponse(
        error=common_pb2.Error(code=status_to_int(code), message=message, field=field)
    )


# ---------------------------------------------------------------- gRPC servicer


class GenerationServicer(router_pb2_grpc.GenerationServiceServicer):
    """`specdec.v1.GenerationService` over `Router`; the only place errors become statuses."""

    def __init__(self, router: Router) -> None:
        self._router = router

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        tenant = self._router.gatekeeper.caller(dict(context.invocation_metadata() or ()).get("authorization"))
        stream = self._router.generate(request, timeout=context.time_remaining(), tenant=tenant)
        try:
            async for response in stream:
                yield response
        except SpecdecError as e:
            # Raised only before the first message, so a status is still possible.
            metadata = ((FIELD_METADATA, e.field),) if e.field else ()
            details = f"{e.field}: {e.message}" if e.field and e.field not in e.message else e.message
            await context.abort(e.code, details, trailing_metadata=metadata)
        finally:
            await stream.aclose()

    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        return self._router.list_models()


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Every public RPC but health passes `Gatekeeper.admit` (reflection too: it describes
    the API); a refused call ends UNAUTHENTICATED or RESOURCE_EXHAUSTED before its handler."""

    def __init__(self, gatekeeper: Gatekeeper) -> None:
        self.gatekeeper = gatekeeper

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(f"/{health.SERVICE_NAME}/"):
            return handler
        metadata = dict(details.invocation_metadata or ())
        try:
            self.gatekeeper.admit(metadata.get("authorization"), "grpc")
        except SpecdecError as e:
            return _refusal(handler, e)
        return handler


def _refusal(handler: grpc.RpcMethodHandler, err: SpecdecError) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that aborts with `err`'s status."""

    async def abort(request_or_iterator, context):
        await context.abort(err.code, err.message)

    async def abort_stream(request_or_iterator, context):
        await context.abort(err.code, err.message)
        yield  # pragma: no cover - makes this an async generator

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(abort_stream if handler.response_streaming else abort,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)  # fmt: skip


@dataclass(slots=True)
class GrpcServer:
    server: grpc.aio.Server
    port: int
    health: HealthReporter

    async def set_serving(self, serving: bool) -> None:
        await self.health.set(serving)


async def start_grpc_server(router: Router, host: str, port: int) -> GrpcServer:
    """GenerationService + health (NOT_SERVING until `set_serving(True)`) + reflection."""
    server = grpc_server(router.limits, interceptors=[AuthInterceptor(router.gatekeeper)])
    router_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(router), server)
    health_reporter = HealthReporter(server, [GENERATION_SERVICE_NAME])
    await health_reporter.set(False)
    if router.auth.reflection:
        reflection.enable_server_reflection(
            (GENERATION_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    bound = add_port(server, f"{host}:{port}", public_server_credentials(router.tls))
    if bound == 0:
        raise OSError(f"cannot bind the router's gRPC port {host}:{port}")
    await server.start()
    return GrpcServer(server=server, port=bound, health=health_reporter)


async def wait_for_health(
    address: str, timeout: float, service: str = "", credentials: grpc.ChannelCredentials | None = None
) -> None:
    """Poll grpc.health.v1 on `address` until SERVING (raises TimeoutError)."""
    deadline = time.monotonic() + timeout
    async with aio_channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout:.0f}s")
            await asyncio.sleep(0.2)


def parse_verifier_flags(values: Iterable[str]) -> Mapping[str, list[str]]:
    """`NAME=HOST:PORT` flags → {name: [addresses]}."""
    out: dict[str, list[str]] = {}
    for value in values:
        name, sep, address = value.partition("=")
        if not sep or not name or ":" not in address:
            raise ValueError(f"--verifier expects NAME=HOST:PORT, got {value!r}")
        out.setdefault(name, []).append(address)
    return out
