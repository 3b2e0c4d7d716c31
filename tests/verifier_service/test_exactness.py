"""Greedy output of every method equals target-only HF greedy (20 HumanEval prompts, 64 tokens),
each method with its configured default (the policy users get), and `sorted` also with a
confidence-threshold exit vector (S2D's adaptive exit)."""

from __future__ import annotations

import pytest

from shared.config import SpeculationConfig, default_config
from shared.ngram import NgramProposerFactory
from shared.types import GenerationRequest
from tests.exactness import compare_greedy, humaneval_prompts
from verifier_service.engine import load_target
from verifier_service.loop import SpecDecodeLoop
from verifier_service.policy import RulePolicy

pytestmark = pytest.mark.slow

NUM_PROMPTS = 20
MAX_NEW_TOKENS = 64
# the load arms off: they run a drafter plain where it loses, and exactness needs drafts
CONFIG = default_config(speculation=SpeculationConfig(load_aware=False))
SORTED = next((d for d in CONFIG.drafters if d.kind == "sorted"), None)
# S2D's confidence exits: the drafter's own thresholds from sorted.json
VARIANTS = {
    "none": ("none", {}),
    "ngram": ("ngram", {}),
    "draft_model": ("draft_model", {}),
    "sorted": ("sorted", {}),
    "sorted-thresholds": ("sorted", {"fixed_exit": -1.0}),
}


@pytest.fixture(scope="module")
def factories():
    from drafter_service.draft_model import DraftModelProposerFactory

    out = {"ngram": NgramProposerFactory(CONFIG.ngram), "draft_model": DraftModelProposerFactory(CONFIG.drafters[0])}
    if SORTED is not None:
        from drafter_service.sorted import SortedProposerFactory

        out["sorted"] = SortedProposerFactory(SORTED)
    return out


@pytest.fixture(scope="module", params=[t.name for t in CONFIG.targets])
def target(request):
    engine, tokenizer = load_target(CONFIG.target(request.param))
    policy = RulePolicy(CONFIG.speculation_for(request.param))
    return request.param, SpecDecodeLoop(engine, tokenizer, policy), tokenizer


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_hf_generate(target, variant, factories, record_property):
    name, loop, tokenizer = target
    method, drafter_params = VARIANTS[variant]
    if method == "sorted" and SORTED is None:
        pytest.skip("no sorted drafter configured")
    factory = factories.get(method)
    ties, num_draft, num_accepted, exits = [], 0, 0, set()
    for i, prompt in enumerate(humaneval_prompts(NUM_PROMPTS)):
        ids = tokenizer(prompt).input_ids
        request = GenerationRequest(prompt_ids=ids, max_new_tokens=MAX_NEW_TOKENS, method=method,
                                    drafter_params=drafter_params)  # fmt: skip
        proposer = factory.new_session(ids, request.sampling) if factory else None
        *chunks, result = loop.generate(request, proposer)
        assert [t for c in chunks for t in c.token_ids] == result.token_ids
        cmp = compare_greedy(name, ids, result.token_ids, MAX_NEW_TOKENS)
        assert cmp.ok, f"{name}/{variant} prompt {i} diverged at {cmp.position} (top-2 gap {cmp.top2_gap} >= {cmp.threshold})"
        if cmp.tie:
            ties.append(f"prompt {i} @ {cmp.position} (gap {cmp.top2_gap:.2e} < {cmp.threshold:.2e})")
        num_draft += result.stats.num_draft_tokens
        num_accepted += result.stats.num_accepted_tokens
        exits |= set(result.stats.num_draft_tokens_per_exit)
    record_property("ties", ties)
    if ties:
        print(f"floating-point ties for {name}/{variant}: {ties}")
    if method == "none":
        assert num_draft == 0
    else:  # the drafter really drafted, and the target accepted some of it
        assert 0 < num_accepted <= num_draft
    if variant == "sorted-thresholds":  # confidence exits: tokens left at more than one exit
        assert len(exits) > 1, exits


def test_sixteen_concurrent_requests_equal_alone_and_hf(target, factories):
    """16 requests in one batch (mixed prompt lengths, methods and max_new_tokens, greedy,
    a small step budget so prompts prefill in chunks beside decoding rows): each output
    equals the same request served alone and HF greedy."""
    name, loop, tokenizer = target
    batched = SpecDecodeLoop(loop.engine.resized(16), tokenizer, loop.policy, max_step_tokens=64)
    methods = [m for m in ("none", "ngram", "draft_model", "sorted") if m in factories or m == "none"]
    requests = []
    for i, prompt in enumerate(humaneval_prompts(16, offset=20)):
        ids = tokenizer(prompt).input_ids[: 20 + 9 * i]  # 20 .. 155 tokens
        requests.append(GenerationRequest(prompt_ids=ids, max_new_tokens=16 + 4 * (i % 5), method=methods[i % len(methods)]))
    sessions = []
    for request in requests:
        factory = factories.get(request.method)
        sessions.append((request, factory.new_session(request.prompt_ids, request.sampling) if factory else None))
    results = batched.run_together(sessions)
    assert batched.peak_rows >= 8  # many rows shared steps (prefill chunks keep some waiting)
    ties = []
    for i, request in enumerate(requests):
        factory = factories.get(request.method)
        proposer = factory.new_session(request.prompt_ids, request.sampling) if factory else None
        *_, alone = loop.generate(request, proposer)
        got = results[i].token_ids
        cmp = compare_greedy(name, request.prompt_ids, got, request.max_new_tokens)
        assert cmp.ok, f"{name} row {i} ({request.method}) diverged from HF at {cmp.position}"
        if got != alone.token_ids:  # batched and alone may differ only at a tie
            assert cmp.tie or compare_greedy(name, request.prompt_ids, alone.token_ids, request.max_new_tokens).tie
            ties.append(i)
    if ties:
        print(f"floating-point ties for {name} in the batch: rows {ties}")
