"""Sampled output of the batched speculative loop has the target's distribution, alone and
sharing its steps with other rows; a seeded request is the same alone, in a full batch and
whatever k it drafts with.

χ² over the joint distribution of the first two generated tokens, (t1, t2): t1 comes from
prefill, t2 from a speculative round (accepted draft or the target's own token). The
expected joint p(t1) p(t2 | t1) comes from HF forwards with the same sampling transform.
"""

from __future__ import annotations

import pytest

from drafter_service.draft_model import DraftModelProposerFactory
from shared.config import default_config
from shared.ngram import NgramProposerFactory
from shared.sampling import SamplingParams
from shared.types import GenerationRequest, GenerationResult
from tests.exactness import humaneval_prompts
from tests.sampling_stats import assert_matches_joint, expected_joint
from verifier_service.engine import load_target
from verifier_service.loop import SpecDecodeLoop
from verifier_service.policy import RulePolicy

pytestmark = pytest.mark.slow

CONFIG = default_config()
NUM_SAMPLES = 2000
PARAMS = dict(temperature=1.0, top_k=3)


@pytest.fixture(scope="module")
def setup():
    engine, tokenizer = load_target(CONFIG.target("codelm-target-s"), max_batch_rows=4)
    loop = SpecDecodeLoop(engine, tokenizer, RulePolicy(CONFIG.speculation))
    drafts = DraftModelProposerFactory(CONFIG.drafters[0])
    prompts = [tokenizer(p).input_ids for p in humaneval_prompts(4, offset=2)]
    return loop, drafts, prompts


def run_together(loop, requests, drafts) -> list[GenerationResult]:
    """Requests added to one loop at once, stepped until all finished: their results."""
    factories = {"draft_model": drafts, "ngram": NgramProposerFactory(CONFIG.ngram)}
    sessions = []
    for request in requests:
        factory = factories.get(request.method)
        sessions.append((request, factory.new_session(request.prompt_ids, request.sampling) if factory else None))
    results = loop.run_together(sessions)
    for item in results:
        assert isinstance(item, GenerationResult), item
    return results


def sample_pairs(loop, drafts, prompts, company: int) -> tuple[dict, int]:
    """NUM_SAMPLES seeded requests for prompts[0], each sharing its steps with `company`
    greedy requests of the other prompts."""
    counts: dict[tuple[int, int], int] = {}
    num_draft_tokens = 0
    for seed in range(NUM_SAMPLES):
        params = SamplingParams(**PARAMS, seed=seed)
        request = GenerationRequest(prompt_ids=prompts[0], max_new_tokens=4, sampling=params,
                                    method="draft_model", num_speculative_tokens=2)  # fmt: skip
        others = [GenerationRequest(prompt_ids=p, max_new_tokens=3 + i, method="draft_model")
                  for i, p in enumerate(prompts[1 : 1 + company])]  # fmt: skip
        result = run_together(loop, [request, *others], drafts)[0]
        pair = tuple(result.token_ids[:2])
        counts[pair] = counts.get(pair, 0) + 1
        num_draft_tokens += result.stats.num_draft_tokens
    return counts, num_draft_tokens


@pytest.mark.parametrize(("kind", "company"), [("alone", 0), ("in a batch of 2", 1)])
def test_output_distribution_matches_target(setup, kind, company):
    loop, drafts, prompts = setup
    joint = expected_joint("codelm-target-s", prompts[0], SamplingParams(**PARAMS))
    counts, num_draft_tokens = sample_pairs(loop, drafts, prompts, company)
    assert num_draft_tokens > 0, "no speculative round ran"
    assert_matches_joint(counts, joint, kind)


def test_seeded_sampling_is_reproducible_alone_in_a_batch_and_whatever_k(setup):
    loop, drafts, prompts = setup

    def request(seed: int, k: int | None = None, method: str = "draft_model") -> GenerationRequest:
        return GenerationRequest(prompt_ids=prompts[0], max_new_tokens=24, method=method,
                                 sampling=SamplingParams(temperature=0.8, seed=seed), num_speculative_tokens=k)  # fmt: skip

    def alone(req: GenerationRequest) -> list[int]:
        return run_together(loop, [req], drafts)[0].token_ids

    reference = alone(request(7))
    assert alone(request(7)) == reference
    assert alone(request(7, k=1)) == reference  # another k
    assert alone(request(7, method="none")) == reference  # no drafts at all
    company = [GenerationRequest(prompt_ids=p, max_new_tokens=30, method="ngram",
                                 sampling=SamplingParams(temperature=0.8)) for p in prompts[1:]]  # fmt: skip
    in_batch = run_together(loop, [request(7, k=4), *company], drafts)  # a full batch of 4 rows
    assert in_batch[0].token_ids == reference
    assert any(alone(request(s)) != reference for s in (8, 9, 10))
