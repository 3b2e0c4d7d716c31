"""Sampled output of the speculative loop has the target's distribution; seeds reproduce.

χ² over the joint distribution of the first two generated tokens, (t1, t2): t1 comes from
prefill, t2 from a speculative round (accepted draft or recovered token). The expected
joint p(t1) p(t2 | t1) comes from target forwards with the same sampling transform.
"""

from __future__ import annotations


import pytest
import torch
from scipy.stats import chisquare

from drafter_service.draft_model import DraftModelProposerFactory
from shared.config import default_config
from shared.sampling import SamplingParams, logits_to_probs
from shared.types import GenerationRequest
from tests.exactness import humaneval_prompts
from verifier_service.engine import load_target
from verifier_service.loop import SpecDecodeLoop
from verifier_service.policy import RulePolicy

pytestmark = pytest.mark.slow

CONFIG = default_config()
NUM_SAMPLES = 2000
PARAMS = dict(temperature=1.0, top_k=3)


@pytest.fixture(scope="module")
def setup():
    engine, tokenizer = load_target(CONFIG.target("codelm-target-s"))
    loop = SpecDecodeLoop(engine, tokenizer, RulePolicy(CONFIG.speculation))
    drafts = DraftModelProposerFactory(CONFIG.drafters[0])
    prompt = tokenizer(humaneval_prompts(1, offset=2)[0]).input_ids
    return engine, loop, drafts, prompt


def expected_joint(engine, prompt: list[int], params: SamplingParams) -> dict[tuple[int, int], float]:
    with torch.inference_mode():
        p1 = logits_to_probs(engine.model(torch.tensor([prompt])).logits[0, -1], params)
        joint = {}
        for t1 in p1.nonzero().flatten().tolist():
            p2 = logits_to_probs(engine.model(torch.tensor([prompt + [t1]])).logits[0, -1], params)
            for t2 in p2.nonzero().flatten().tolist():
                joint[(t1, t2)] = float(p1[t1] * p2[t2])
    return joint


def sample_pairs(loop, drafts, prompt, draft_sampling_of) -> tuple[dict, int]:
    counts: dict[tuple[int, int], int] = {}
    num_draft_tokens = 0
    for seed in range(NUM_SAMPLES):
        params = SamplingParams(**PARAMS, seed=seed)
        request = GenerationRequest(prompt_ids=prompt, max_new_tokens=4, sampling=params, num_speculative_tokens=2)
        proposer = drafts.new_session(prompt, draft_sampling_of(params))
        *_, result = loop.generate(request, proposer)
        pair = tuple(result.token_ids[:2])
        counts[pair] = counts.get(pair, 0) + 1
        num_draft_tokens += result.stats.num_draft_tokens
    return counts, num_draft_tokens


@pytest.mark.parametrize(
    "kind, draft_sampling_of",
    [
        ("model drafts with q", lambda params: params),  # sampled from q, q shipped
        ("deterministic drafts, one-hot q", lambda params: SamplingParams()),  # argmax drafts
    ],
)
def test_output_distribution_matches_target(setup, kind, draft_sampling_of):
    engine, loop, drafts, prompt = setup
    joint = expected_joint(engine, prompt, SamplingParams(**PARAMS))
    counts, num_draft_tokens = sample_pairs(loop, drafts, prompt, draft_sampling_of)
    assert num_draft_tokens > 0, "no speculative round ran"
    assert set(counts) <= set(joint), f"{kind}: impossible pairs {set(counts) - set(joint)}"
    cells = sorted(joint)
    observed = [counts.get(c, 0) for c in cells]
    expected = [joint[c] * NUM_SAMPLES for c in cells]
    # merge cells expected < 5 into one so χ² is valid
    small = [i for i, e in enumerate(expected) if e < 5]
    if small:
        observed = [o for i, o in enumerate(observed) if i not in small] + [sum(observed[i] for i in small)]
        expected = [e for i, e in enumerate(expected) if i not in small] + [sum(expected[i] for i in small)]
    scale = sum(observed) / sum(expected)
    result = chisquare(observed, [e * scale for e in expected])
    assert result.pvalue > 1e-3, f"{kind}: χ² p={result.pvalue:.2e} observed={observed} expected={expected}"


def test_seeded_sampling_is_deterministic(setup):
    engine, loop, drafts, prompt = setup

    def run(seed: int) -> list[int]:
        params = SamplingParams(temperature=0.8, seed=seed)
        request = GenerationRequest(prompt_ids=prompt, max_new_tokens=24, sampling=params)
        *_, result = loop.generate(request, drafts.new_session(prompt, params))
        return result.token_ids

    assert run(7) == run(7)
    assert any(run(7) != run(s) for s in (8, 9, 10))
