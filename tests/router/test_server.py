"""Router core against real in-process verifiers: two replicas of codelm-target-s (real
VerifierServicer, real model) on 127.0.0.1:0, no mocks. Placement, admission, faults of a
replica, draining, and the gRPC edge's status mapping."""

from __future__ import annotations

import contextlib

import grpc
import pytest
import pytest_asyncio

from router.server import Router, start_grpc_server
from shared.config import default_config
from shared.errors import ResourceExhaustedError, UnavailableError, status_from_int
from shared.loading import tokenizer_hash
from shared.pb.specdec.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.grpc_servers import start_verifier_server
from verifier_service.engine import load_target
from verifier_service.loop import SpecDecodeLoop
from verifier_service.policy import RulePolicy
from verifier_service.servicer import VerifierServicer

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

TARGET = "codelm-target-s"
_DEFAULT = default_config()
CONFIG = _DEFAULT.model_copy(update={"drafters": [], "targets": [
    t.model_copy(update={"max_batch_rows": 2, "max_queued_requests": 0}) for t in _DEFAULT.targets]})  # fmt: skip
LONG = 1000


@pytest.fixture(scope="module")
def spec_loop():
    engine, tokenizer = load_target(CONFIG.target(TARGET))
    return SpecDecodeLoop(engine, tokenizer, RulePolicy(CONFIG.speculation))


async def _start_replica(spec_loop):
    servicer = VerifierServicer(CONFIG, TARGET)
    # each replica its own step loop and slots, over the same weights
    engine = spec_loop.engine.resized(CONFIG.target(TARGET).max_batch_rows)
    servicer.attach(SpecDecodeLoop(engine, spec_loop.tokenizer, spec_loop.policy), tokenizer_hash(CONFIG.target(TARGET).model_dir))
    return await start_verifier_server(servicer)


@pytest_asyncio.fixture(loop_scope="session")
async def replicas(spec_loop):
    running = [await _start_replica(spec_loop) for _ in range(2)]
    yield running
    for r in running:
        await r.stop(None)


@pytest_asyncio.fixture(loop_scope="session")
async def router(replicas):
    router = Router.from_config(CONFIG)
    for r in replicas:
        await router.add_replica(TARGET, r.address)
    yield router
    await router.close()


def _request(max_new_tokens: int = LONG, model: str = TARGET, **kw) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(model=model, text="def f(x):", max_new_tokens=max_new_tokens,
                                      method="none", **kw)  # fmt: skip


async def _open(router: Router):
    """A started stream (first message received) and that message."""
    stream = router.generate(_request())
    first = await stream.__anext__()
    return stream, first


def _active(router: Router) -> list[int]:
    return [r.active for r in router.registry.replicas(TARGET)]


async def test_least_loaded_placement_then_resource_exhausted(router):
    streams = []
    try:
        for expected in ([0, 1], [1, 1], [1, 2], [2, 2]):
            stream, first = await _open(router)
            assert first.WhichOneof("response") == "chunk"
            streams.append(stream)
            assert sorted(_active(router)) == expected  # the emptier replica takes it
        with pytest.raises(ResourceExhaustedError):
            await _open(router)
        assert sorted(_active(router)) == [2, 2]  # a refused request holds no slot
    finally:
        for stream in streams:
            await stream.aclose()
    assert _active(router) == [0, 0]
    assert router.num_in_flight == 0


async def test_short_request_completes_and_releases(router):
    kinds = [m.WhichOneof("response") async for m in router.generate(_request(max_new_tokens=8))]
    assert kinds[-1] == "complete" and set(kinds[:-1]) == {"chunk"}
    assert _active(router) == [0, 0]


async def test_replica_dying_mid_stream_is_an_in_band_error_then_skipped(router, replicas):
    stream, _ = await _open(router)
    victim = next(r for r, rep in zip(replicas, router.registry.replicas(TARGET)) if rep.active)
    await victim.stop(0)  # in-flight RPCs are cancelled
    messages = [m async for m in stream]
    assert messages[-1].WhichOneof("response") == "error"
    assert status_from_int(messages[-1].error.code) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert _active(router) == [0, 0]

    # The load poll marks it unhealthy; placement then uses the other replica only.
    for rep in router.registry.replicas(TARGET):
        await router._refresh(rep)
    health = {rep.address: rep.healthy for rep in router.registry.replicas(TARGET)}
    assert health[victim.address] is False and sum(health.values()) == 1
    kinds = [m.WhichOneof("response") async for m in router.generate(_request(max_new_tokens=4))]
    assert kinds[-1] == "complete"
    assert {m.name: m.num_replicas for m in router.list_models().models}[TARGET] == 1


async def test_no_healthy_replica_is_unavailable(router, replicas):
    for r in replicas:
        await r.stop(0)
    for rep in router.registry.replicas(TARGET):
        await router._refresh(rep)
    with pytest.raises(UnavailableError):
        await _open(router)


async def test_draining_router_refuses_new_requests(router):
    router.draining = True
    with pytest.raises(UnavailableError):
        await _open(router)
    assert router.num_in_flight == 0


async def test_grpc_edge_maps_domain_errors_to_status(router):
    server = await start_grpc_server(router, "127.0.0.1", 0)
    await server.set_serving(True)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = router_pb2_grpc.GenerationServiceStub(channel)
            cases = [
                (_request(model="nope"), grpc.StatusCode.NOT_FOUND, "model"),
                (_request(max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
                (_request(sampling=common_pb2.SamplingParams(top_p=2.0)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
            ]
            for request, code, field in cases:
                call = stub.Generate(request, timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in call:
                        pass
                assert info.value.code() == code
                assert dict(info.value.trailing_metadata() or ())["specdec-field"] == field
            # A full stream through the edge, and ListModels.
            kinds = [m.WhichOneof("response") async for m in stub.Generate(_request(max_new_tokens=4))]
            assert kinds[-1] == "complete"
            models = await stub.ListModels(router_pb2.ListModelsRequest(), timeout=10)
            info = {m.name: m for m in models.models}
            assert info[TARGET].num_replicas == 2 and "ngram" in info[TARGET].methods
    finally:
        with contextlib.suppress(Exception):
            await server.server.stop(None)
