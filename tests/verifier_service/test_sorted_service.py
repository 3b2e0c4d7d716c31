"""Method `sorted` through real gRPC on loopback: one drafter pool serving the committed
S2D drafter (`models/codelm-sorted`) to a verifier of each demo target, all in this process.

Greedy output equals target-only greedy for both targets; concurrent requests of both
targets share the drafter and come out right; the pool batches drafter forwards of sessions
ready at the same time (batch size > 1, made certain at the pool level with real sessions);
the final stats report the configured k and exit, the verifier's metrics the tokens per exit.
"""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
import pytest_asyncio
import torch

from drafter_service.pool import DrafterPool, ProposeCall
from shared import metrics
from shared.config import default_config
from shared.loading import tokenizer_hash
from shared.paths import PROJECT_ROOT
from shared.pb.specdec.v1 import verifier_pb2, verifier_pb2_grpc
from shared.protocol import PROTOCOL_VERSION
from shared.sampling import SamplingParams
from shared.types import GenerationRequest
from tests.exactness import compare_greedy, humaneval_prompts
from tests.grpc_servers import start_drafter_server, start_verifier_server, wait_for
from verifier_service.engine import load_target
from verifier_service.loop import SpecDecodeLoop
from verifier_service.policy import RulePolicy
from verifier_service.servicer import VerifierServicer

DEMO = PROJECT_ROOT / "models" / "codelm-sorted"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.skipif(not (DEMO / "sorted.json").is_file(), reason="no demo sorted drafter"),
]

_DEFAULT = default_config()
# NOTE: drafter and verifiers share one process (and the GIL) here; a generous draft
# timeout keeps concurrent sessions speculating instead of degrading to k = 0. The load
# arms are off: they run a drafter plain where it loses, and these tests need it to draft.
# So do steps that wait for a new session's prefill (no catch-up while the row runs plain:
# six 32-token requests at once could end before the pool had prefilled them all).
CONFIG = _DEFAULT.model_copy(update={
    "drafters": [d for d in _DEFAULT.drafters if d.kind == "sorted"],
    "speculation": _DEFAULT.speculation.model_copy(
        update={"draft_timeout_s": 5.0, "load_aware": False, "catch_up_tokens": 10**9}),
})  # fmt: skip
DRAFTER = "codelm-sorted"
TARGETS = ("codelm-target-m", "codelm-target-s")
MAX_NEW_TOKENS = 32


@pytest.fixture(scope="module")
def loops():
    out = {}
    for name in TARGETS:
        engine, tokenizer = load_target(CONFIG.target(name))
        out[name] = (SpecDecodeLoop(engine, tokenizer, RulePolicy(CONFIG.speculation)), tokenizer)
    return out


@pytest.fixture(scope="module")
def prompts(loops):
    _, tokenizer = loops[TARGETS[0]]
    return [tokenizer(p).input_ids for p in humaneval_prompts(4, offset=10)]


@pytest.fixture(scope="module")
def pool():
    pool = DrafterPool.load(CONFIG.drafters, CONFIG.targets)
    yield pool
    pool.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def verifiers(loops, pool):
    drafter = await start_drafter_server(pool)
    running = {}
    for name in TARGETS:
        servicer = VerifierServicer(CONFIG, name, drafter_address=drafter.address)
        ref = loops[name][0]  # the in-process reference; the servicer steps its own loop and slots
        own = SpecDecodeLoop(ref.engine.resized(4), ref.tokenizer, RulePolicy(CONFIG.speculation))
        servicer.attach(own, tokenizer_hash(CONFIG.target(name).model_dir))
        running[name] = await start_verifier_server(servicer)
    yield running
    for r in running.values():
        await r.stop(None)
        r.servicer.close()
    await drafter.stop(None)


def request(model, prompt, max_new_tokens=MAX_NEW_TOKENS):
    return verifier_pb2.VerifierGenerateRequest(
        request_id="sorted-test", model=model, prompt_token_ids=prompt,
        max_new_tokens=max_new_tokens, method="sorted",
    )  # fmt: skip


async def generate(verifier, req):
    async with grpc.aio.insecure_channel(verifier.address) as channel:
        stub = verifier_pb2_grpc.VerifierServiceStub(channel)
        tokens, complete = [], None
        async for resp in stub.Generate(req):
            kind = resp.WhichOneof("response")
            if kind == "chunk":
                tokens.extend(resp.chunk.token_ids)
            elif kind == "complete":
                complete = resp.complete
            else:
                raise AssertionError(f"in-band error: {resp.error}")
    assert complete is not None and list(complete.token_ids) == tokens
    return tokens, complete


def reference(loops, model, prompt, max_new_tokens=MAX_NEW_TOKENS):
    spec_loop, _ = loops[model]
    *_, result = spec_loop.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=max_new_tokens), None)
    return result.token_ids


def assert_same_greedy(loops, model, prompt, got, max_new_tokens=MAX_NEW_TOKENS):
    expected = reference(loops, model, prompt, max_new_tokens)
    if got != expected:  # only a floating-point tie (DESIGN.md's rule) may explain it
        cmp = compare_greedy(model, prompt, got, max_new_tokens)
        assert cmp.ok, f"{model}: diverged at {cmp.position} (gap {cmp.top2_gap} >= {cmp.threshold})"


# ---------------------------------------------------------------- exactness, policy report


async def test_pool_attached_both_targets_at_load(pool):
    factory = pool._drafters[DRAFTER].factory
    assert set(factory.targets) == set(TARGETS)


@pytest.mark.parametrize("model", TARGETS)
async def test_greedy_sorted_equals_target_only(loops, verifiers, prompts, model):
    num_draft_tokens = 0
    for prompt in prompts[:3]:
        tokens, complete = await generate(verifiers[model], request(model, prompt))
        assert_same_greedy(loops, model, prompt, tokens)
        num_draft_tokens += complete.stats.num_draft_tokens
        policy = dict(complete.stats.policy)
        # the configured greedy default (speculation.methods.sorted), in the final stats
        default = CONFIG.speculation.methods["sorted"].for_request(greedy=True)
        if default.rule == "plus2minus1":  # k moved with the acceptance
            assert policy["plus2minus1"] == 1.0 and 1 <= policy["k"] <= CONFIG.speculation.max_speculative_tokens
        else:
            assert policy["k"] == default.num_speculative_tokens, policy
        assert {"k", *default.drafter_params} <= set(policy), policy
    assert num_draft_tokens > 0  # the shared drafter really drafted
    labels = {"model": model}
    drafted = [
        metrics.sample_value("specdec:num_draft_tokens_per_exit_total", {**labels, "exit": str(e)})
        or 0
        for e in (1, 2, 3)
    ]
    assert sum(drafted) > 0


async def test_concurrent_requests_of_both_targets_share_the_drafter(loops, verifiers, prompts, pool):
    before = metrics.sample_value("specdec:drafter_batch_size_count", {"drafter": DRAFTER}) or 0.0
    jobs = [(model, prompts[i]) for model in TARGETS for i in range(3)]  # 3 per target at once
    results = await asyncio.gather(*(generate(verifiers[m], request(m, p)) for m, p in jobs))
    for (model, prompt), (tokens, complete) in zip(jobs, results):
        assert_same_greedy(loops, model, prompt, tokens)
        assert complete.stats.num_draft_tokens > 0
    assert await wait_for(lambda: pool.active_sessions == 0)
    after = metrics.sample_value("specdec:drafter_batch_size_count", {"drafter": DRAFTER})
    assert after > before  # the shared drafter's batcher served them


# ---------------------------------------------------------------- batching, made certain


async def test_pool_batches_sessions_of_both_targets_ready_together(pool, loops, prompts):
    """Sessions of both targets queue while the batcher is held busy, so the next batch
    must hold them all; every session's draft equals its draft alone."""
    hashes = {m: tokenizer_hash(CONFIG.target(m).model_dir) for m in TARGETS}
    sessions = [
        pool.open_session(m, hashes[m], PROTOCOL_VERSION, "sorted", DRAFTER, p, SamplingParams())
        for m in TARGETS for p in prompts[:2]
    ]  # fmt: skip
    rng = random.Random(0)
    contexts = [p + [rng.randrange(5, 4000)] for m in TARGETS for p in prompts[:2]]
    hist = "specdec:drafter_batch_size_bucket"
    count = "specdec:drafter_batch_size_count"
    labels = {"drafter": DRAFTER}
    single_before = metrics.sample_value(hist, {**labels, "le": "1.0"}) or 0.0
    batches_before = metrics.sample_value(count, labels) or 0.0

    blocker = sessions[0]
    blocker.lock.acquire()  # the batcher's first batch (the blocker alone) waits on this
    try:
        first = asyncio.ensure_future(pool.propose(ProposeCall(blocker, contexts[0], 4)))
        await asyncio.sleep(0.2)  # the batcher took the first call and waits for its lock
        rest = [asyncio.ensure_future(pool.propose(ProposeCall(s, c, 4)))
                for s, c in zip(sessions[1:], contexts[1:])]  # fmt: skip
        await asyncio.sleep(0.05)
    finally:
        blocker.lock.release()
    results = [await first, *[await r for r in rest]]
    batches = metrics.sample_value(count, labels) - batches_before
    single = metrics.sample_value(hist, {**labels, "le": "1.0"}) - single_before
    assert batches == 2 and single == 1, (batches, single)  # the blocker alone, then the rest
    for session, context, result in zip(sessions, contexts, results):
        alone = pool._drafters[DRAFTER].factory.new_session(context, SamplingParams())
        with torch.inference_mode():
            draft = alone.propose(context, 4)
        assert (result.draft.token_ids, result.exit_layers) == (draft.token_ids, draft.exit_layers)
        session.close()
    assert pool.active_sessions == 0
