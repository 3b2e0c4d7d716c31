"""DrafterService.Draft against a real grpc.aio server and the trained codelm-draft."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import pytest_asyncio
import torch

from drafter_service.pool import DrafterPool
from shared import metrics
from shared.config import default_config
from shared.loading import load_tokenizer
from shared.pb.specdec.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc
from shared.protocol import PROTOCOL_VERSION
from shared.sampling import SamplingParams
from tests.exactness import humaneval_prompts
from tests.grpc_servers import start_drafter_server, wait_for
from verifier_service.draft_client import RemoteProposerFactory

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

CONFIG = default_config()
DRAFTER = CONFIG.drafters[0]  # codelm-draft


@pytest.fixture(scope="module")
def pool():
    pool = DrafterPool.load([DRAFTER])
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def prompts():
    tok = load_tokenizer(DRAFTER.model_dir)
    return [tok(p).input_ids for p in humaneval_prompts(3)]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def drafter(pool):
    running = await start_drafter_server(pool)
    yield running
    await running.stop(None)


@pytest_asyncio.fixture(loop_scope="session")
async def stub(drafter):
    async with grpc.aio.insecure_channel(drafter.address) as channel:
        yield drafter_pb2_grpc.DrafterServiceStub(channel)


def open_request(pool, prompt, **overrides) -> drafter_pb2.DraftRequest:
    fields = dict(
        protocol_version=PROTOCOL_VERSION,
        target="codelm-target-m",
        tokenizer_hash=pool.tokenizer_hash,
        token_ids=prompt,
        method="draft_model",
    )
    fields.update(overrides)
    return drafter_pb2.DraftRequest(open=drafter_pb2.Open(**fields))


def commit(epoch, accepted_length, token_ids, k) -> drafter_pb2.DraftRequest:
    return drafter_pb2.DraftRequest(
        commit=drafter_pb2.Commit(
            epoch=epoch, accepted_length=accepted_length, token_ids=token_ids, num_speculative_tokens=k
        )
    )


def remote_factory(drafter, tok_hash, target="codelm-target-m"):
    return RemoteProposerFactory(drafter.address, target, tok_hash, "draft_model", timeout_s=2.0)


def in_process_draft(pool, context, k, sampling=SamplingParams()):
    factory = pool._drafters[DRAFTER.name].factory
    proposer = factory.new_session(context, sampling)
    with torch.inference_mode():
        return proposer.propose(context, k)


# ---------------------------------------------------------------- protocol


async def test_open_commit_candidates_match_in_process_proposer(pool, stub, prompts):
    prompt = prompts[0]
    call = stub.Draft()
    await call.write(open_request(pool, prompt))
    opened = await call.read()
    assert opened.opened.drafter == DRAFTER.name
    assert opened.opened.protocol_version == PROTOCOL_VERSION

    # Round 1: the prompt as is.
    await call.write(commit(1, len(prompt), [], 5))
    first = (await call.read()).candidates
    assert first.epoch == 1 and first.start_position == len(prompt)
    assert list(first.token_ids) == in_process_draft(pool, prompt, 5).token_ids
    assert not first.draft_probs  # greedy: deterministic draft, one-hot q
    assert 0 < first.compute_s < 10  # the drafter CPU seconds it cost, for the verifier's policy

    # Round 2: two drafts accepted plus a correction token; the drafter reconciles its cache.
    tail = list(first.token_ids[:2]) + [7]
    await call.write(commit(2, len(prompt), tail, 4))
    second = (await call.read()).candidates
    context = prompt + tail
    assert second.epoch == 2 and second.start_position == len(context)
    assert list(second.token_ids) == in_process_draft(pool, context, 4).token_ids

    # Round 3: the verifier rolled back further than the drafter's context (accepted_length
    # shorter than what it sent): still equal to drafting from scratch.
    context = prompt[:-3] + [11, 12]
    await call.write(commit(3, len(prompt) - 3, [11, 12], 3))
    third = (await call.read()).candidates
    assert list(third.token_ids) == in_process_draft(pool, context, 3).token_ids

    # k = 0 keeps the session open and sends nothing; the next commit is answered.
    await call.write(commit(4, len(context), [5], 0))
    await call.write(commit(5, len(context) + 1, [], 2))
    fifth = (await call.read()).candidates
    assert fifth.epoch == 5 and fifth.start_position == len(context) + 1
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_unseeded_sampled_session_ships_full_draft_probs(pool, stub, prompts):
    prompt = prompts[1]
    call = stub.Draft()
    sampling = common_pb2.SamplingParams(temperature=0.8)  # no seed: q is shipped
    await call.write(open_request(pool, prompt, sampling=sampling))
    await call.read()
    await call.write(commit(1, len(prompt), [], 3))
    cand = (await call.read()).candidates
    call.cancel()
    assert len(cand.token_ids) == 3
    assert cand.vocab_size == 4096
    q = np.frombuffer(cand.draft_probs, dtype="<f4").reshape(3, cand.vocab_size)
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-4)
    # Each draft token was drawn from its own row of q, so it has positive probability there.
    assert all(q[i, t] > 0 for i, t in enumerate(cand.token_ids))


@pytest.mark.parametrize(
    "overrides, code",
    [
        ({"tokenizer_hash": "0123456789abcdef"}, grpc.StatusCode.FAILED_PRECONDITION),
        ({"protocol_version": PROTOCOL_VERSION + 1}, grpc.StatusCode.FAILED_PRECONDITION),
        ({"method": "sorted"}, grpc.StatusCode.NOT_FOUND),  # no sorted drafter in this pool
        ({"method": "ngram"}, grpc.StatusCode.INVALID_ARGUMENT),  # runs in the verifier
        ({"method": "beam"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"drafter": "no-such-drafter"}, grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_open_rejected(pool, stub, prompts, overrides, code):
    call = stub.Draft()
    await call.write(open_request(pool, prompts[0], **overrides))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call.read()
    assert e.value.code() == code
    assert pool.active_sessions == 0


async def test_first_message_must_be_open(stub):
    call = stub.Draft()
    await call.write(commit(1, 0, [1, 2], 3))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call.read()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_non_increasing_epoch_rejected(pool, stub, prompts):
    call = stub.Draft()
    await call.write(open_request(pool, prompts[0]))
    await call.read()
    await call.write(commit(1, len(prompts[0]), [], 1))
    await call.read()
    await call.write(commit(1, len(prompts[0]), [], 1))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call.read()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await wait_for(lambda: pool.active_sessions == 0)


async def test_stale_epochs_are_dropped_latest_wins(pool, drafter, stub, prompts):
    """Commits sent in a burst cross the first draft in flight: only the latest is answered."""
    prompt = prompts[0]
    dropped_before = drafter.servicer.num_stale_dropped
    call = stub.Draft()
    await call.write(open_request(pool, prompt))
    await call.read()
    context = list(prompt)
    for epoch in range(1, 11):
        await call.write(commit(epoch, len(context), [100 + epoch], 10))
        context.append(100 + epoch)
    epochs = []
    while not epochs or epochs[-1] != 10:
        cand = (await call.read()).candidates
        epochs.append(cand.epoch)
        last = cand
    call.cancel()
    assert epochs == sorted(set(epochs)), epochs  # strictly increasing: nothing stale sent late
    assert len(epochs) < 10, epochs
    assert drafter.servicer.num_stale_dropped > dropped_before
    assert last.start_position == len(context)
    assert list(last.token_ids) == in_process_draft(pool, context, 10).token_ids


@pytest.mark.parametrize("while_drafting", [False, True])
async def test_client_cancel_frees_the_session(pool, stub, prompts, while_drafting):
    gauge = {"service": "drafter", "model": DRAFTER.name}
    call = stub.Draft()
    await call.write(open_request(pool, prompts[2]))
    await call.read()
    assert pool.active_sessions == 1
    assert metrics.sample_value("specdec:num_active_sessions", gauge) == 1
    await call.write(commit(1, len(prompts[2]), [], 10))
    if not while_drafting:
        await call.read()
    call.cancel()
    assert await wait_for(lambda: pool.active_sessions == 0)
    assert metrics.sample_value("specdec:num_active_sessions", gauge) == 0


# ---------------------------------------------------------------- client side (RemoteProposer)


async def test_remote_proposer_drops_late_candidates(pool, drafter, prompts):
    """A round that timed out leaves its candidates in flight; the next round skips them."""
    import asyncio

    factory = remote_factory(drafter, pool.tokenizer_hash)
    prompt = prompts[0]
    proposer = factory.new_session(prompt, SamplingParams())
    loop = asyncio.get_running_loop()
    try:
        proposer.timeout_s = 1e-4  # round 1 cannot make it
        assert (await loop.run_in_executor(None, proposer.propose, prompt, 5)).token_ids == []
        assert proposer.num_timeouts == 1 and not proposer.degraded
        assert await wait_for(lambda: pool.active_sessions == 1)
        await asyncio.sleep(0.3)  # round 1's candidates arrive meanwhile
        proposer.timeout_s = 2.0
        context = prompt + [42]
        draft = await loop.run_in_executor(None, proposer.propose, context, 4)
        assert proposer.num_stale_dropped == 1
        assert draft.token_ids == in_process_draft(pool, context, 4).token_ids
        # both rounds' drafter compute is reported, the dropped one's too, and taken once
        assert proposer.take_compute_s() > 0 and proposer.take_compute_s() == 0
    finally:
        proposer.close()
        factory.close()
    assert await wait_for(lambda: pool.active_sessions == 0)


async def test_remote_proposer_is_not_waited_for_while_it_catches_up(pool, drafter, prompts):
    """The loop's `request` for a drafter far behind the context (a new stream, or many
    tokens decoded plainly) only sends the context: nothing to collect that round, and
    nothing asked until the drafter has answered; then rounds draft as usual, exactly."""
    import asyncio

    factory = RemoteProposerFactory(drafter.address, "codelm-target-m", pool.tokenizer_hash, "draft_model",
                                    timeout_s=2.0, catch_up_tokens=16)  # fmt: skip
    prompt = prompts[0]
    proposer = factory.new_session(prompt, SamplingParams())

    def round_(context, k=4):
        proposer.request(context, k)
        return proposer.catching_up, proposer.collect(time.monotonic() + 2.0).token_ids

    loop = asyncio.get_running_loop()
    try:
        assert await loop.run_in_executor(None, round_, prompt) == (True, [])  # a new stream
        context = list(prompt)
        for _ in range(200):  # decoded plainly meanwhile
            context.append(7)
            catching_up, draft = await loop.run_in_executor(None, round_, context)
            if not catching_up:
                break
            assert draft == []
            await asyncio.sleep(0.01)
        assert not catching_up and draft == in_process_draft(pool, context, 4).token_ids
        context = context + [11, 12, 13]  # a few new tokens: an ordinary round
        assert await loop.run_in_executor(None, round_, context) == (False, in_process_draft(pool, context, 4).token_ids)
        context = context + [7] * 17  # more than catch_up_tokens decoded plainly
        assert (await loop.run_in_executor(None, round_, context))[0] is True
        # one round alone (`propose`) waits for the catch-up
        context = context + [5] * 20
        draft = await loop.run_in_executor(None, proposer.propose, context, 4)
        assert draft.token_ids == in_process_draft(pool, context, 4).token_ids
        assert proposer.num_timeouts == 0 and not proposer.degraded
    finally:
        proposer.close()
        factory.close()
    assert await wait_for(lambda: pool.active_sessions == 0)


async def test_remote_proposer_rejected_hash_degrades_for_good(pool, drafter, prompts):
    import asyncio

    factory = remote_factory(drafter, "0123456789abcdef", target="other-target")
    proposer = factory.new_session(prompts[0], SamplingParams())
    loop = asyncio.get_running_loop()
    try:
        draft = await loop.run_in_executor(None, proposer.propose, prompts[0], 5)
        assert draft.token_ids == [] and proposer.degraded
        assert not factory.available
        assert factory.rejected.code == grpc.StatusCode.FAILED_PRECONDITION
        # No retry for a permanent rejection: no new stream is opened.
        proposer._retry_at = 0.0
        await loop.run_in_executor(None, proposer.propose, prompts[0], 5)
        assert proposer.num_reopens == 0
    finally:
        proposer.close()
        factory.close()


async def test_round_trip_latency(pool, drafter, prompts, record_property):
    """Commit -> Candidates on loopback, minus the same propose run in process (k = 1)."""
    import asyncio

    factory = remote_factory(drafter, pool.tokenizer_hash)
    prompt = prompts[0]
    proposer = factory.new_session(prompt, SamplingParams())
    local = pool._drafters[DRAFTER.name].factory.new_session(prompt, SamplingParams())

    def measure(p, n=40):
        context = list(prompt)
        times = []
        with torch.inference_mode():
            for _ in range(n):
                t0 = time.perf_counter()
                draft = p.propose(context, 1)
                times.append(time.perf_counter() - t0)
                context.append(draft.token_ids[0] if draft.token_ids else 7)
        return float(np.median(times[5:]))

    loop = asyncio.get_running_loop()
    try:
        remote_s = await loop.run_in_executor(None, measure, proposer)
        local_s = await loop.run_in_executor(None, measure, local)
    finally:
        proposer.close()
        factory.close()
    record_property("remote_ms", remote_s * 1e3)
    record_property("local_ms", local_s * 1e3)
    print(f"k=1 propose: remote {remote_s * 1e3:.2f} ms, in process {local_s * 1e3:.2f} ms, "
          f"round trip {(remote_s - local_s) * 1e3:.2f} ms")
    assert remote_s - local_s < 0.05


# ---------------------------------------------------------------- cross-session batching


class _SequentialBatchFactory:
    """The real draft_model factory plus a `propose_batch` that runs the batch one by one:
    enough to drive the pool's batcher (used for drafters such as sorted)."""

    method = "draft_model"

    def __init__(self, inner) -> None:
        self.inner = inner
        self.config = inner.config
        self.tokenizer_hash = inner.tokenizer_hash
        self.vocab_size = inner.vocab_size
        self.batch_sizes: list[int] = []

    @property
    def targets(self):
        return self.inner.targets

    def attach_target(self, name, target_tokenizer_hash):
        self.inner.attach_target(name, target_tokenizer_hash)

    def new_session(self, prompt_ids, sampling):
        return self.inner.new_session(prompt_ids, sampling)

    def propose_batch(self, requests):
        self.batch_sizes.append(len(requests))
        return [proposer.propose(context, k) for proposer, context, k in requests]


async def test_batcher_serves_concurrent_sessions_exactly(pool, prompts):
    import asyncio

    factory = _SequentialBatchFactory(pool._drafters[DRAFTER.name].factory)
    batching_pool = DrafterPool.from_factories({DRAFTER.name: factory}, {DRAFTER.name: pool.tokenizer_hash})
    running = await start_drafter_server(batching_pool)
    rounds = 6

    async def session(prompt, stub):
        call = stub.Draft()
        await call.write(open_request(batching_pool, prompt))
        await call.read()
        context, got = list(prompt), []
        for epoch in range(1, rounds + 1):
            await call.write(commit(epoch, len(context), [epoch + 20], 3))
            context.append(epoch + 20)
            cand = (await call.read()).candidates
            got.append((list(context), list(cand.token_ids)))
        call.cancel()
        return got

    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = drafter_pb2_grpc.DrafterServiceStub(channel)
            results = await asyncio.gather(*(session(p, stub) for p in prompts * 2))
        assert await wait_for(lambda: batching_pool.active_sessions == 0)
    finally:
        await running.stop(None)
        batching_pool.shutdown()
    for got in results:
        for context, token_ids in got:
            assert token_ids == in_process_draft(pool, context, 3).token_ids
    assert sum(factory.batch_sizes) == rounds * len(results)
    assert max(factory.batch_sizes) > 1, factory.batch_sizes  # rounds of several sessions at once
