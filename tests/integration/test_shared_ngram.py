"""Two verifier replicas of one target share a real Redis: replica B drafts from the n-gram
table and accepts tokens that only replica A's earlier output holds (also when A served
them with `none`, through the real servicers); Redis killed mid-run
costs speculation only (every request completes with the target's own output) and the
table works again when Redis returns."""

from __future__ import annotations

import time

import grpc
import pytest

from shared import metrics
from shared.config import default_config
from shared.loading import tokenizer_hash
from shared.ngram import NgramProposerFactory
from shared.ngram_table import SharedNgramTable
from shared.pb.specdec.v1 import verifier_pb2, verifier_pb2_grpc
from shared.store import RedisStore, StoreRunner
from shared.types import GenerationRequest
from tests.exactness import compare_greedy, humaneval_prompts
from tests.grpc_servers import generate_complete, verifier_replicas
from tests.redis_server import RedisServer
from verifier_service.engine import load_target
from verifier_service.loop import SpecDecodeLoop
from verifier_service.policy import RulePolicy

CONFIG = default_config()
TARGET = "codelm-target-s"
# a fixed k (the rule's), never stepped aside by load arms: this test is about the drafts
SPECULATION = CONFIG.speculation.model_copy(update={"load_aware": False})
MAX_NEW = 48


class Replica:
    """One verifier replica: its own engine, loop, store connection and table."""

    def __init__(self, url: str, engine, tokenizer) -> None:
        self.runner = StoreRunner(RedisStore(url, socket_timeout_s=0.2, breaker_cooldown_s=0.5))
        self.table = SharedNgramTable(self.runner, CONFIG.store.shared_ngram, tokenizer_hash(CONFIG.target(TARGET).model_dir),
                                      TARGET, engine.vocab_size)  # fmt: skip
        self.factory = NgramProposerFactory(CONFIG.ngram, self.table)
        self.loop = SpecDecodeLoop(engine.resized(2), tokenizer, RulePolicy(SPECULATION))

    def generate(self, prompt: list[int]):
        request = GenerationRequest(prompt_ids=prompt, max_new_tokens=MAX_NEW, method="ngram")
        proposer = self.factory.new_session(prompt, request.sampling)
        (result,) = self.loop.run_together([(request, proposer)])
        self.table.learn(prompt, result.token_ids)  # what the servicer does with every result
        return result, proposer

    def flush(self) -> None:
        """(test only) wait until the writes queued so far have run on the store's loop."""
        self.runner.submit(_noop).result(5)


async def _noop() -> None:
    return None


@pytest.fixture(scope="module")
def target():
    return load_target(CONFIG.target(TARGET), max_batch_rows=2)


@pytest.mark.slow
def test_replica_b_accepts_what_replica_a_wrote(tmp_path, target):
    engine, tokenizer = target
    server = RedisServer(tmp_path)
    a, b = Replica(server.url, engine, tokenizer), Replica(server.url, engine, tokenizer)
    try:
        prompts = [tokenizer(p).input_ids for p in humaneval_prompts(3, offset=7)]
        for prompt in prompts:
            result, _ = a.generate(prompt)
            assert compare_greedy(TARGET, prompt, result.token_ids, MAX_NEW).ok
        a.flush()
        time.sleep(0.2)  # the writes queued after each result
        accepted = metrics.SHARED_NGRAM_TOKENS.labels(TARGET, "accepted")
        before = accepted._value.get()
        hits = 0
        for prompt in prompts:
            result, proposer = b.generate(prompt)
            assert compare_greedy(TARGET, prompt, result.token_ids, MAX_NEW).ok
            hits += proposer.shared.num_hits
        assert hits > 0, "replica B never drafted from the table"
        assert accepted._value.get() > before, "no table draft was accepted"

        # Redis killed mid-run: exact output, failures counted; back: the table answers again
        failed = metrics.SHARED_NGRAM_FETCHES.labels(TARGET, "failed")
        failed_before = failed._value.get()
        server.stop()
        # prompts B has not seen: their lookups are not among its recent answers, so they ask the store
        for prompt in [tokenizer(p).input_ids for p in humaneval_prompts(2, offset=20)]:
            result, _ = b.generate(prompt)
            assert compare_greedy(TARGET, prompt, result.token_ids, MAX_NEW).ok
        assert failed._value.get() > failed_before
        assert metrics.STORE_UP.labels("redis")._value.get() == 0
        server.start()
        time.sleep(0.6)
        deadline = time.monotonic() + 10
        while b.table.fetch(prompts[0][:4]).exception(5) is not None:
            assert time.monotonic() < deadline, "the table did not come back with Redis"
            time.sleep(0.2)
    finally:
        a.runner.close()
        b.runner.close()
        server.stop()


async def _served(stub, prompt: list[int], method: str, tenant: str) -> list[int]:
    request = verifier_pb2.VerifierGenerateRequest(model=TARGET, prompt_token_ids=prompt, max_new_tokens=MAX_NEW,
                                                   method=method, tenant=tenant)  # fmt: skip
    return list((await generate_complete(stub, request)).token_ids)


@pytest.mark.slow
async def test_requests_of_every_method_teach_the_table_of_their_tenant(tmp_path, target):
    """Replica A serves tenant t1 with `none` (no drafting at all); replica B's `ngram` then
    drafts and accepts what A's outputs hold for t1 (the servicer teaches the table every
    result), and nothing of it for other tenants (each tenant has its own table)."""
    engine, tokenizer = target
    server = RedisServer(tmp_path)
    config = CONFIG.model_copy(update={"store": CONFIG.store.model_copy(update={"redis_url": server.url}),
                                       "speculation": SPECULATION})  # fmt: skip
    try:
        async with verifier_replicas(config, TARGET, engine, tokenizer, SPECULATION) as servers:
            prompts = [tokenizer(p).input_ids for p in humaneval_prompts(3, offset=13)]
            accepted = metrics.SHARED_NGRAM_TOKENS.labels(TARGET, "accepted")
            async with grpc.aio.insecure_channel(servers[0].address) as ca, grpc.aio.insecure_channel(servers[1].address) as cb:
                stub_a, stub_b = verifier_pb2_grpc.VerifierServiceStub(ca), verifier_pb2_grpc.VerifierServiceStub(cb)
                for prompt in prompts:
                    assert compare_greedy(TARGET, prompt, await _served(stub_a, prompt, "none", "t1"), MAX_NEW).ok
                servers[0].servicer.store.submit(_noop).result(5)  # A's queued writes have run
                drafted = metrics.SHARED_NGRAM_TOKENS.labels(TARGET, "drafted")
                before = drafted._value.get()
                for i, prompt in enumerate(prompts):  # (a tenant each: none learns from another prompt first)
                    assert compare_greedy(TARGET, prompt, await _served(stub_b, prompt, "ngram", f"t2-{i}"), MAX_NEW).ok
                assert drafted._value.get() == before, "another tenant drafted from tenant t1's table"
                before = accepted._value.get()
                for prompt in prompts:
                    assert compare_greedy(TARGET, prompt, await _served(stub_b, prompt, "ngram", "t1"), MAX_NEW).ok
        assert accepted._value.get() > before, "replica B accepted nothing from what `none` taught t1"
    finally:
        server.stop()
