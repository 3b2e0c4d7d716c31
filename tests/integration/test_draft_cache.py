"""Two verifier replicas of one target (real servicers on grpc.aio, in this process) share a
real Redis with the draft cache on: replica A serves prompts, replica B serves the same
prompts afterwards and drafts from what A stored. B accepts clearly more tokens per round
than A did, and both outputs equal HF greedy."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from shared import metrics
from shared.config import default_config
from shared.draft_cache import draft_key
from shared.pb.specdec.v1 import verifier_pb2, verifier_pb2_grpc
from tests.exactness import compare_greedy, humaneval_prompts
from tests.grpc_servers import generate_complete, verifier_replicas
from tests.redis_server import RedisServer
from verifier_service.engine import load_target

pytestmark = pytest.mark.slow

TARGET = "codelm-target-s"
MAX_NEW = 48


def _config(redis_url: str):
    base = default_config()
    store = base.store.model_copy(update={
        "redis_url": redis_url,
        "draft_cache": base.store.draft_cache.model_copy(update={"enabled": True}),
        # off: B's gain must come from the draft cache, not from the n-gram table A taught
        "shared_ngram": base.store.shared_ngram.model_copy(update={"enabled": False}),
    })  # fmt: skip
    # a fixed k (the rule's), never stepped aside by load arms: this test is about the drafts
    speculation = base.speculation.model_copy(update={"load_aware": False})
    return base.model_copy(update={"store": store, "speculation": speculation})


async def _generate(stub, prompt: list[int]):
    request = verifier_pb2.VerifierGenerateRequest(model=TARGET, prompt_token_ids=prompt, max_new_tokens=MAX_NEW,
                                                   method="ngram")  # fmt: skip
    return await generate_complete(stub, request)


async def test_replica_b_drafts_what_replica_a_served(tmp_path):
    redis = RedisServer(tmp_path)
    config = _config(redis.url)
    engine, tokenizer = load_target(config.target(TARGET), max_batch_rows=2)
    try:
        async with verifier_replicas(config, TARGET, engine, tokenizer, config.speculation) as servers:
            b = servers[1].servicer
            prompts = [tokenizer(p).input_ids for p in humaneval_prompts(3, offset=11)]
            hits = metrics.DRAFT_CACHE_LOOKUPS.labels(TARGET, "hit")
            accepted = metrics.DRAFT_CACHE_TOKENS.labels(TARGET, "accepted")
            async with grpc.aio.insecure_channel(servers[0].address) as ca, grpc.aio.insecure_channel(servers[1].address) as cb:
                stub_a, stub_b = verifier_pb2_grpc.VerifierServiceStub(ca), verifier_pb2_grpc.VerifierServiceStub(cb)
                per_round = {"a": [], "b": []}
                for prompt in prompts:
                    done = await _generate(stub_a, prompt)
                    assert compare_greedy(TARGET, prompt, list(done.token_ids), MAX_NEW).ok
                    per_round["a"].append(done.stats.num_accepted_tokens / done.stats.num_rounds)
                    # A queued the write after its last message: wait until B's store connection sees it
                    key = draft_key(TARGET, prompt)
                    for _ in range(100):
                        if b.store.submit(b.store.store.get, key).result(5):
                            break
                        await asyncio.sleep(0.05)
                    else:
                        raise AssertionError("replica A's output never reached Redis")
                hits_before, accepted_before = hits._value.get(), accepted._value.get()
                for prompt in prompts:
                    done = await _generate(stub_b, prompt)
                    assert compare_greedy(TARGET, prompt, list(done.token_ids), MAX_NEW).ok
                    per_round["b"].append(done.stats.num_accepted_tokens / done.stats.num_rounds)
        assert hits._value.get() == hits_before + len(prompts), "replica B did not find A's entries"
        assert accepted._value.get() > accepted_before + len(prompts) * MAX_NEW / 2
        mean_a, mean_b = (sum(v) / len(v) for v in (per_round["a"], per_round["b"]))
        print(f"accepted tokens per round: A {mean_a:.2f}, B {mean_b:.2f}")
        assert mean_b > 1.5 * mean_a + 0.5, per_round
    finally:
        redis.stop()
