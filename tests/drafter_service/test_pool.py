"""The pool with a real (tiny, random) sorted drafter over gRPC: cross-session batching,
exit depths in Candidates, sticky Commit.params mapped to thresholds (and the verifier's
RemoteProposer sending them), pool-level checks."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
import torch

from drafter_service.pool import DrafterPool
from drafter_service.sorted import SortedExitsConfig
from shared import metrics
from shared.config import DrafterConfig
from shared.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from shared.pb.specdec.v1 import drafter_pb2, drafter_pb2_grpc
from shared.protocol import PROTOCOL_VERSION
from shared.sampling import SamplingParams
from tests.drafter_service.test_sorted import EXITS, VOCAB, tiny_model, write_fake_tokenizer
from tests.grpc_servers import start_drafter_server, wait_for

NAME = "tiny-sorted"


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    path = tmp_path_factory.mktemp("pool_sorted")
    tiny_model().save_pretrained(str(path))
    write_fake_tokenizer(path)
    SortedExitsConfig(exits=EXITS, thresholds={1: 0.5, 2: 0.4}, matmul_dtype="float32").save(path)
    pool = DrafterPool.load([DrafterConfig(name=NAME, model_dir=path, kind="sorted")])
    yield pool
    pool.shutdown()


def from_scratch(pool, context, k, fixed_exit=None):
    proposer = pool._drafters[NAME].factory.new_session(context, SamplingParams())
    if fixed_exit is not None:
        proposer.set_fixed_exit(fixed_exit)
    with torch.inference_mode():
        draft = proposer.propose(context, k)
    return draft.token_ids, list(proposer.last_exit_layers)


def test_resolve_table(pool):
    h = pool.tokenizer_hash
    assert pool.methods == ["card", "sorted"] and pool.drafter_names == [NAME]
    assert pool.resolve(PROTOCOL_VERSION, h, "sorted").name == NAME
    assert pool.resolve(PROTOCOL_VERSION, h, "sorted", NAME).name == NAME
    # card runs ahead with any drafter of the pool: the named one, else the first
    assert pool.resolve(PROTOCOL_VERSION, h, "card", NAME).name == NAME
    assert pool.resolve(PROTOCOL_VERSION, h, "card").name == NAME
    for args, error in [
        ((PROTOCOL_VERSION + 1, h, "sorted"), FailedPreconditionError),
        ((PROTOCOL_VERSION, "ffff", "sorted"), FailedPreconditionError),
        ((PROTOCOL_VERSION, h, "draft_model"), NotFoundError),
        ((PROTOCOL_VERSION, h, "ngram"), InvalidArgumentError),
        ((PROTOCOL_VERSION, h, "sorted", "other"), NotFoundError),
        ((PROTOCOL_VERSION, h, "card", "other"), NotFoundError),
    ]:
        with pytest.raises(error):
            pool.resolve(*args)


@pytest.mark.asyncio(loop_scope="session")
async def test_sorted_sessions_are_batched_and_exact(pool):
    running = await start_drafter_server(pool)
    batches = metrics.sample_value("specdec:drafter_batch_size_count", {"drafter": NAME}) or 0.0
    rounds, k = 6, 4

    async def session(stub, seed, fixed_exit):
        rng = random.Random(seed)
        context = [rng.randrange(1, VOCAB) for _ in range(12)]
        call = stub.Draft()
        await call.write(
            drafter_pb2.DraftRequest(
                open=drafter_pb2.Open(
                    protocol_version=PROTOCOL_VERSION, target=f"target-{seed % 2}",
                    tokenizer_hash=pool.tokenizer_hash, token_ids=context, method="sorted",
                )
            )
        )  # fmt: skip
        assert (await call.read()).opened.drafter == NAME
        got = []
        for epoch in range(1, rounds + 1):
            params = {"fixed_exit": float(fixed_exit)} if fixed_exit is not None and epoch == 1 else {}
            tail = [rng.randrange(1, VOCAB)]
            commit = drafter_pb2.Commit(
                epoch=epoch, accepted_length=len(context), token_ids=tail,
                num_speculative_tokens=k, params=params,
            )  # fmt: skip
            await call.write(drafter_pb2.DraftRequest(commit=commit))
            context = context + tail
            cand = (await call.read()).candidates
            got.append((context, list(cand.token_ids), list(cand.exit_layers)))
        call.cancel()
        return fixed_exit, got

    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = drafter_pb2_grpc.DrafterServiceStub(channel)
            results = await asyncio.gather(
                *(session(stub, seed, 1 if seed == 0 else None) for seed in range(4))
            )
        assert await wait_for(lambda: pool.active_sessions == 0)
    finally:
        await running.stop(None)
    for fixed_exit, got in results:
        for context, token_ids, exit_layers in got:
            assert (token_ids, exit_layers) == from_scratch(pool, context, k, fixed_exit)
            assert len(exit_layers) == len(token_ids)
            if fixed_exit is not None:
                assert set(exit_layers) == {fixed_exit}
    num_batches = metrics.sample_value("specdec:drafter_batch_size_count", {"drafter": NAME}) - batches
    assert 0 < num_batches <= rounds * len(results)
    # Both targets were attached to the shared drafter on Open.
    assert set(pool._drafters[NAME].factory.targets) == {"target-0", "target-1"}


@pytest.mark.asyncio(loop_scope="session")
async def test_remote_proposer_forwards_sticky_params_and_exit_layers(pool):
    from verifier_service.draft_client import RemoteProposerFactory

    running = await start_drafter_server(pool)
    factory = RemoteProposerFactory(
        running.address, "target-r", pool.tokenizer_hash, "sorted", timeout_s=5.0
    )
    rng = random.Random(7)
    context = [rng.randrange(1, VOCAB) for _ in range(10)]

    def rounds():  # blocking client: run it off the event loop
        proposer = factory.new_session(context, SamplingParams())
        out = []
        for params in ({"fixed_exit": 1.0}, {}, {"fixed_exit": -1.0, "threshold.1": 2.0, "threshold.2": 2.0}):
            proposer.set_params(params)
            sent_before = dict(proposer._sent_params)
            draft = proposer.propose(context, 3)
            changed = {k: v for k, v in proposer._sent_params.items() if sent_before.get(k) != v}
            out.append((draft.token_ids, draft.exit_layers, changed))
        proposer.close()
        return out

    try:
        out = await asyncio.to_thread(rounds)
        assert await wait_for(lambda: pool.active_sessions == 0)
    finally:
        factory.close()
        await running.stop(None)
    (ids1, exits1, sent1), (ids2, exits2, sent2), (ids3, exits3, sent3) = out
    assert exits1 == [1, 1, 1] and sent1 == {"fixed_exit": 1.0}
    assert (ids2, exits2) == (ids1, exits1) and sent2 == {}  # sticky: nothing re-sent
    assert exits3 == [EXITS[-1]] * 3 and set(sent3) == {"fixed_exit", "threshold.1", "threshold.2"}
    assert (ids1, exits1) == from_scratch(pool, context, 3, fixed_exit=1)
    assert (ids3, exits3) == from_scratch(pool, context, 3, fixed_exit=EXITS[-1])


@pytest.mark.asyncio(loop_scope="session")
async def test_unknown_params_end_the_stream_with_invalid_argument(pool):
    running = await start_drafter_server(pool)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            call = drafter_pb2_grpc.DrafterServiceStub(channel).Draft()
            await call.write(drafter_pb2.DraftRequest(open=drafter_pb2.Open(
                protocol_version=PROTOCOL_VERSION, target="t", tokenizer_hash=pool.tokenizer_hash,
                token_ids=[1, 2, 3], method="sorted",
            )))  # fmt: skip
            assert (await call.read()).opened.drafter == NAME
            await call.write(drafter_pb2.DraftRequest(commit=drafter_pb2.Commit(
                epoch=1, accepted_length=3, token_ids=[4], num_speculative_tokens=2,
                params={"threshold.9": 0.5},
            )))  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "threshold.9" in info.value.details()
        assert await wait_for(lambda: pool.active_sessions == 0)
    finally:
        await running.stop(None)


def test_load_attaches_every_configured_target_and_refuses_another_tokenizer(tmp_path):
    from shared.config import TargetConfig
    from shared.loading import tokenizer_hash

    path = tmp_path / "drafter"
    path.mkdir()
    tiny_model().save_pretrained(str(path))
    write_fake_tokenizer(path)
    SortedExitsConfig(exits=EXITS, matmul_dtype="float32").save(path)
    same, other = tmp_path / "same", tmp_path / "other"
    for target, tag in ((same, "a"), (other, "b")):  # "b": a different vocabulary
        target.mkdir()
        tiny_model().config.save_pretrained(str(target))
        write_fake_tokenizer(target, vocab_tag=tag)
    drafter = DrafterConfig(name=NAME, model_dir=path, kind="sorted")
    loaded = DrafterPool.load([drafter], [TargetConfig(name="same", model_dir=same)])
    try:
        assert loaded._drafters[NAME].factory.targets == {"same": tokenizer_hash(same)}
    finally:
        loaded.shutdown()
    with pytest.raises(ValueError, match="tokenizers differ") as info:
        DrafterPool.load([drafter], [TargetConfig(name="other", model_dir=other)])
    assert tokenizer_hash(other) in str(info.value) and "'other'" in str(info.value)
