"""VerifierService against real grpc.aio servers: a verifier of codelm-target-m and a drafter
pool with codelm-draft, both in this process on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import pytest_asyncio

from drafter_service.pool import DrafterPool
from shared import metrics
from shared.config import default_config
from shared.loading import tokenizer_hash
from shared.pb.specdec.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from shared.sampling import SamplingParams
from shared.types import GenerationRequest
from tests.exactness import compare_greedy, humaneval_prompts
from tests.grpc_servers import start_drafter_server, start_verifier_server, wait_for
from verifier_service.engine import load_target
from verifier_service.loop import SpecDecodeLoop
from verifier_service.policy import RulePolicy
from verifier_service.servicer import VerifierServicer

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

_DEFAULT = default_config()
# codelm-draft only; the load arms off (they run a losing drafter plain; the drafter tests need drafts)
CONFIG = _DEFAULT.model_copy(update={
    "drafters": _DEFAULT.drafters[:1], "speculation": _DEFAULT.speculation.model_copy(update={"load_aware": False}),
})  # fmt: skip
TARGET = "codelm-target-m"
MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def target():
    engine, tokenizer = load_target(CONFIG.target(TARGET))
    return SpecDecodeLoop(engine, tokenizer, RulePolicy(CONFIG.speculation)), tokenizer


@pytest.fixture(scope="module")
def prompts(target):
    _, tokenizer = target
    return [tokenizer(p).input_ids for p in humaneval_prompts(4)]


@pytest.fixture(scope="module")
def pool():
    pool = DrafterPool.load(CONFIG.drafters)
    yield pool
    pool.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def drafter(pool):
    """A holder: the fault test stops the server and starts a new one on the same port."""
    holder = {"server": await start_drafter_server(pool)}
    yield holder
    await holder["server"].stop(None)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def verifier(target, drafter):
    spec_loop, _ = target  # the in-process reference; the servicer steps its own loop and slots
    servicer = VerifierServicer(CONFIG, TARGET, drafter_address=drafter["server"].address)
    own = SpecDecodeLoop(spec_loop.engine.resized(4), spec_loop.tokenizer, spec_loop.policy)
    servicer.attach(own, tokenizer_hash(CONFIG.target(TARGET).model_dir))
    running = await start_verifier_server(servicer)
    yield running
    await running.stop(None)
    servicer.close()


@pytest_asyncio.fixture(loop_scope="session")
async def stub(verifier):
    async with grpc.aio.insecure_channel(verifier.address) as channel:
        yield verifier_pb2_grpc.VerifierServiceStub(channel)


def make_request(prompt, method="none", max_new_tokens=MAX_NEW_TOKENS, **fields):
    return verifier_pb2.VerifierGenerateRequest(
        request_id=f"test-{method}",
        model=TARGET,
        prompt_token_ids=prompt,
        max_new_tokens=max_new_tokens,
        method=method,
        **fields,
    )


async def collect(call, on_chunk=None):
    """(chunks' token ids, the complete message) of one Generate stream."""
    tokens, complete = [], None
    async for resp in call:
        kind = resp.WhichOneof("response")
        assert complete is None, "nothing may follow complete"
        if kind == "chunk":
            tokens.extend(resp.chunk.token_ids)
            if on_chunk is not None:
                await on_chunk(resp.chunk)
        elif kind == "complete":
            complete = resp.complete
        else:
            raise AssertionError(f"in-band error: {resp.error}")
    assert complete is not None
    assert list(complete.token_ids) == tokens
    return tokens, complete


def in_process(target, prompt, max_new_tokens=MAX_NEW_TOKENS, sampling=SamplingParams()):
    """The loop without any transport or proposer: the reference output."""
    spec_loop, _ = target
    request = GenerationRequest(prompt_ids=prompt, max_new_tokens=max_new_tokens, sampling=sampling)
    *_, result = spec_loop.generate(request, None)
    return result.token_ids


def assert_same_greedy(target, prompt, got, max_new_tokens=MAX_NEW_TOKENS):
    expected = in_process(target, prompt, max_new_tokens)
    if got != expected:  # only a floating-point tie (DESIGN.md's rule) may explain a difference
        cmp = compare_greedy(TARGET, prompt, got, max_new_tokens)
        assert cmp.tie, f"diverged at {cmp.position} (top-2 gap {cmp.top2_gap} >= {cmp.threshold})"


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("method", ["none", "ngram", "draft_model", "card"])
async def test_greedy_equals_in_process_loop(target, stub, prompts, method):
    num_draft_tokens = 0
    for prompt in prompts[:3]:
        tokens, complete = await collect(stub.Generate(make_request(prompt, method)))
        assert_same_greedy(target, prompt, tokens)
        assert complete.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert complete.usage.prompt_tokens == len(prompt)
        assert complete.usage.completion_tokens == MAX_NEW_TOKENS
        assert complete.stats.num_rounds >= 1
        num_draft_tokens += complete.stats.num_draft_tokens
    if method == "none":
        assert num_draft_tokens == 0
    if method in ("draft_model", "card"):
        assert num_draft_tokens > 0  # the remote drafter really took part


async def test_seeded_sampling_equals_in_process_loop(target, stub, prompts):
    sampling = common_pb2.SamplingParams(temperature=0.8, top_p=0.95, seed=1234)
    tokens, _ = await collect(stub.Generate(make_request(prompts[0], "none", sampling=sampling)))
    expected = in_process(target, prompts[0], sampling=SamplingParams(temperature=0.8, top_p=0.95, seed=1234))
    assert tokens == expected


async def test_model_method_without_a_drafter_for_it_decodes_plainly(target, stub, prompts):
    """`sorted` is a valid method but this pool has no sorted drafter: k = 0, same tokens."""
    tokens, complete = await collect(stub.Generate(make_request(prompts[0], "sorted")))
    assert_same_greedy(target, prompts[0], tokens)
    assert complete.stats.num_draft_tokens == 0


# ---------------------------------------------------------------- bad input and capacity


@pytest.mark.parametrize(
    "overrides, code, field",
    [
        ({"model": "codelm-target-xl"}, grpc.StatusCode.NOT_FOUND, "model"),
        ({"prompt_token_ids": []}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"prompt_token_ids": [5, 4096]}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"prompt_token_ids": [5, -1]}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"prompt_token_ids": [5] * 2048}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (
            {"prompt_token_ids": [5] * 2000, "max_new_tokens": 100},
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_new_tokens",
        ),
        ({"max_new_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        ({"max_new_tokens": 1025}, grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        ({"sampling": common_pb2.SamplingParams(temperature=-1)}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ({"sampling": common_pb2.SamplingParams(temperature=1, top_p=1.5)}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"method": "beam"}, grpc.StatusCode.INVALID_ARGUMENT, "method"),
        ({"num_speculative_tokens": 11}, grpc.StatusCode.INVALID_ARGUMENT, "num_speculative_tokens"),
        ({"stop": [""]}, grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    ],
)
async def test_bad_request_rejected_naming_the_field(stub, verifier, overrides, code, field):
    fields = {"model": TARGET, "prompt_token_ids": [5, 6, 7], "max_new_tokens": 4}
    fields.update(overrides)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await collect(stub.Generate(verifier_pb2.VerifierGenerateRequest(**fields)))
    assert e.value.code() == code
    assert ("specdec-field", field) in tuple(e.value.trailing_metadata())
    assert verifier.servicer.active_sessions == 0


async def test_queue_full_timeout_and_cancel_while_queued(stub, verifier, prompts):
    """Rows full → requests wait in the queue (no first message yet); queue full →
    RESOURCE_EXHAUSTED marked as capacity; a queued request times out with DEADLINE_EXCEEDED;
    a cancelled queued request leaves the queue at once."""
    scheduler = verifier.servicer.scheduler
    rows = scheduler.max_batch_rows
    saved = scheduler.max_queued_requests, scheduler.queue_timeout_s
    scheduler.max_queued_requests = 1
    running = []
    try:
        for i in range(rows):  # fill every row with a long request
            call = stub.Generate(make_request(prompts[i % len(prompts)], max_new_tokens=200))
            await call.read()
            running.append(call)
        queued = stub.Generate(make_request(prompts[0], max_new_tokens=4))
        assert await wait_for(lambda: scheduler.num_queued == 1)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(stub.Generate(make_request(prompts[1])))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("specdec-capacity", "1") in tuple(e.value.trailing_metadata())
        queued.cancel()
        assert await wait_for(lambda: scheduler.num_queued == 0, timeout=1.0)  # at once, rows still busy
        assert scheduler.num_running == rows
        scheduler.queue_timeout_s = 0.3
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(stub.Generate(make_request(prompts[2])))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 5
    finally:
        scheduler.max_queued_requests, scheduler.queue_timeout_s = saved
        for call in running:
            call.cancel()
    assert await wait_for(lambda: verifier.servicer.active_sessions == 0)
    # a queued request that waits its turn completes once a row frees
    tokens, _ = await collect(stub.Generate(make_request(prompts[3], max_new_tokens=4)))
    assert len(tokens) == 4


async def test_get_load(stub, verifier):
    load = await stub.GetLoad(verifier_pb2.GetLoadRequest())
    assert load.model == TARGET
    assert load.max_sessions == verifier.servicer.scheduler.capacity
    assert load.active_sessions == 0
    assert list(load.methods) == ["none", "ngram", "draft_model", "card"]


# ---------------------------------------------------------------- cancellation and faults


async def test_client_cancel_frees_verifier_and_drafter_sessions(stub, verifier, pool, prompts):
    gauge = {"service": "verifier", "model": TARGET}
    call = stub.Generate(make_request(prompts[1], "draft_model", max_new_tokens=200))
    for _ in range(3):
        await call.read()
    assert verifier.servicer.active_sessions == 1
    assert metrics.sample_value("specdec:num_active_sessions", gauge) == 1
    assert await wait_for(lambda: pool.active_sessions == 1)  # the Draft stream is open
    call.cancel()
    assert await wait_for(lambda: verifier.servicer.active_sessions == 0)
    assert await wait_for(lambda: pool.active_sessions == 0)
    assert metrics.sample_value("specdec:num_active_sessions", gauge) == 0


@pytest.mark.parametrize("method", ["draft_model", "card"])
async def test_drafter_down_mid_generation_then_back(target, stub, verifier, drafter, pool, prompts, method):
    """Drafter stopped mid-request: same tokens, no failure; restarted on the same port:
    the same request speculates again (a run-ahead stream reopens with the whole context)."""
    factory = verifier.servicer.remote[method]
    factory.retry_interval_s = 0.2
    old = drafter["server"]
    port = old.port
    restarted = {}
    num_chunks = 0

    async def on_chunk(_chunk):
        nonlocal num_chunks
        num_chunks += 1
        if num_chunks == 3:
            await old.stop(None)  # cancels the open Draft stream
        elif num_chunks == 6:
            restarted["server"] = drafter["server"] = await start_drafter_server(pool, port)

    max_new_tokens = 96
    request = make_request(prompts[2], method, max_new_tokens=max_new_tokens, num_speculative_tokens=4)
    try:
        tokens, complete = await collect(stub.Generate(request), on_chunk)
    finally:
        factory.retry_interval_s = 1.0
    assert "server" in restarted, f"the request ended after {num_chunks} chunks"
    assert_same_greedy(target, prompts[2], tokens, max_new_tokens)
    assert complete.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert old.servicer.num_candidates_sent > 0  # it speculated before the outage
    assert restarted["server"].servicer.num_candidates_sent > 0  # and again after it
    assert await wait_for(lambda: pool.active_sessions == 0)

    # A new request after the outage speculates from its first rounds (its k pinned: the
    # outage's empty rounds taught the load arms that drafting did not pay at one row)
    tokens, complete = await collect(stub.Generate(make_request(prompts[0], method, num_speculative_tokens=4)))
    assert_same_greedy(target, prompts[0], tokens)
    assert complete.stats.num_draft_tokens > 0


async def test_concurrent_sessions_overlap(target, stub, verifier, prompts):
    """Three requests at once (one per method): each is exact, and their chunks interleave,
    which a global lock around generation would make impossible."""
    verifier.servicer.spec_loop.peak_rows = 0
    times: dict[int, list[float]] = {0: [], 1: [], 2: []}
    methods = ["none", "ngram", "draft_model"]
    max_new_tokens = 32

    async def run(i):
        async def on_chunk(_chunk):
            times[i].append(time.perf_counter())

        call = stub.Generate(make_request(prompts[i], methods[i], max_new_tokens=max_new_tokens))
        return await collect(call, on_chunk)

    results = await asyncio.gather(*(run(i) for i in range(3)))
    for i, (tokens, _) in enumerate(results):
        assert_same_greedy(target, prompts[i], tokens, max_new_tokens)
    assert verifier.servicer.spec_loop.peak_rows == 3  # one batch
    # Chunks of other requests streamed while request i was between its first and last chunk.
    interleaved = [
        sum(times[i][0] < t < times[i][-1] for j in times if j != i for t in times[j]) for i in times
    ]
    assert min(interleaved) > 0, interleaved
