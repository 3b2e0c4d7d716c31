"""Fuzzing every internal RPC with messages drawn from their descriptors
(`tests.proto_strategies`), against real servers in this process (a verifier of
codelm-target-s, the drafter pool with codelm-draft): every call ends with a result or a
client-fault status (never INTERNAL or UNKNOWN), no session stays open, and a valid request
succeeds afterwards. `max_new_tokens` and k are capped small so cases stay cheap.
`SPECDEC_FUZZ_EXAMPLES` sets the cases per property."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drafter_service.pool import DrafterPool
from drafter_service.servicer import DrafterServicer
from shared import metrics
from shared.config import default_config
from shared.loading import tokenizer_hash
from shared.pb.specdec.v1 import drafter_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from shared.protocol import PROTOCOL_VERSION
from tests.proto_strategies import messages
from verifier_service.engine import load_target
from verifier_service.loop import SpecDecodeLoop
from verifier_service.policy import RulePolicy
from verifier_service.servicer import VerifierServicer

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("SPECDEC_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
TARGET = "codelm-target-s"
CONFIG = default_config().model_copy(update={"drafters": [default_config().drafters[0]]})
CLIENT_FAULTS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                 grpc.StatusCode.CANCELLED, grpc.StatusCode.OUT_OF_RANGE}  # fmt: skip


class LoopThread:
    """An asyncio loop in a thread that hosts grpc.aio servers for blocking test clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _serve(add, servicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def servers():
    loop = LoopThread()
    pool = DrafterPool.load(CONFIG.drafters, CONFIG.targets)
    drafter, drafter_address = loop.run(_serve(drafter_pb2_grpc.add_DrafterServiceServicer_to_server,
                                               DrafterServicer(pool)))  # fmt: skip
    engine, tokenizer = load_target(CONFIG.target(TARGET), max_batch_rows=4)
    verifier_servicer = VerifierServicer(CONFIG, TARGET, drafter_address=drafter_address)
    verifier_servicer.attach(SpecDecodeLoop(engine, tokenizer, RulePolicy(CONFIG.speculation)),
                             tokenizer_hash(CONFIG.target(TARGET).model_dir))  # fmt: skip
    verifier, verifier_address = loop.run(_serve(verifier_pb2_grpc.add_VerifierServiceServicer_to_server,
                                                 verifier_servicer))  # fmt: skip
    yield {"pool": pool, "drafter": drafter_address, "verifier": verifier_address, "servicer": verifier_servicer}
    loop.run(verifier.stop(None))
    loop.run(drafter.stop(None))
    verifier_servicer.close()
    pool.shutdown()
    loop.close()


def _cheap_verifier_request(msg: verifier_pb2.VerifierGenerateRequest) -> verifier_pb2.VerifierGenerateRequest:
    if msg.max_new_tokens > 4:
        msg.max_new_tokens = 4
    if msg.HasField("num_speculative_tokens") and msg.num_speculative_tokens > 4:
        msg.num_speculative_tokens = 4
    return msg


@FUZZ
@given(msg=messages(verifier_pb2.VerifierGenerateRequest).map(_cheap_verifier_request))
def test_verifier_generate_fuzz(servers, msg):
    with grpc.insecure_channel(servers["verifier"]) as channel:
        stub = verifier_pb2_grpc.VerifierServiceStub(channel)
        try:
            for response in stub.Generate(msg, timeout=60):
                if response.WhichOneof("response") == "error":
                    assert response.error.code != grpc.StatusCode.INTERNAL.value[0], response.error
        except grpc.RpcError as e:
            assert e.code() in CLIENT_FAULTS, (msg, e.code(), e.details())
        load = stub.GetLoad(verifier_pb2.GetLoadRequest(), timeout=10)
        assert load.model == TARGET


def _cheap_draft_request(msg: drafter_pb2.DraftRequest) -> drafter_pb2.DraftRequest:
    if msg.WhichOneof("request") == "commit" and msg.commit.num_speculative_tokens > 4:
        msg.commit.num_speculative_tokens = 4
    return msg


def _valid_open(pool) -> drafter_pb2.DraftRequest:
    return drafter_pb2.DraftRequest(open=drafter_pb2.Open(
        protocol_version=PROTOCOL_VERSION, target=TARGET, tokenizer_hash=pool.tokenizer_hash,
        token_ids=[1, 2, 3], method="draft_model"))  # fmt: skip


@FUZZ
@given(stream=st.lists(messages(drafter_pb2.DraftRequest).map(_cheap_draft_request), min_size=1, max_size=3),
       start_valid=st.booleans())  # fmt: skip
def test_drafter_stream_fuzz(servers, stream, start_valid):
    """A stream of drafted messages (after a valid Open half the time, so Commits reach the
    session code)."""
    requests = ([_valid_open(servers["pool"])] if start_valid else []) + stream
    with grpc.insecure_channel(servers["drafter"]) as channel:
        stub = drafter_pb2_grpc.DrafterServiceStub(channel)
        try:
            for _ in stub.Draft(iter(requests), timeout=30):
                pass
        except grpc.RpcError as e:
            assert e.code() in CLIENT_FAULTS, (requests, e.code(), e.details())


def test_no_session_left_open_and_valid_requests_still_work(servers):
    with grpc.insecure_channel(servers["verifier"]) as channel:
        stub = verifier_pb2_grpc.VerifierServiceStub(channel)
        msg = verifier_pb2.VerifierGenerateRequest(model=TARGET, prompt_token_ids=[1, 2, 3], max_new_tokens=4,
                                                   method="draft_model")  # fmt: skip
        last = list(stub.Generate(msg, timeout=60))[-1]
        assert last.WhichOneof("response") == "complete"
    def drafter_sessions() -> float:
        return metrics.sample_value("specdec:num_active_sessions", {"service": "drafter", "model": "codelm-draft"}) or 0

    # NOTE: a stream's session closes just after its call ends on the client: allow a moment
    deadline = time.monotonic() + 10
    while (servers["servicer"].active_sessions or drafter_sessions()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert servers["servicer"].active_sessions == 0
    assert drafter_sessions() == 0
