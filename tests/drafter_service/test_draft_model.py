"""draft_model proposals made with the incremental KV cache equal proposals from scratch."""

from __future__ import annotations

import random

import pytest

from drafter_service.draft_model import DraftModelProposerFactory
from shared.config import default_config
from shared.loading import load_tokenizer
from shared.proposer import common_prefix_len
from shared.sampling import SamplingParams
from tests.exactness import humaneval_prompts

CONFIG = default_config()


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([], [1, 2], 0),  # empty cache
        ([1, 2, 3], [1, 2, 3, 4], 3),  # context extends the cache
        ([1, 2, 3, 4], [1, 2], 2),  # context shorter
        ([1, 2, 9, 4], [1, 2, 3, 4], 2),  # mismatch in the middle
        ([7], [1], 0),  # mismatch at the start
    ],
)
def test_common_prefix_len(a, b, expected):
    assert common_prefix_len(a, b) == expected


@pytest.fixture(scope="module")
def factory():
    return DraftModelProposerFactory(CONFIG.drafters[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_equals_from_scratch(factory, seed):
    # Simulate rounds: accept a random prefix of the draft, then a correction token that
    # differs from the next draft token (or a bonus token when all are accepted).
    rng = random.Random(seed)
    tokenizer = load_tokenizer(CONFIG.drafters[0].model_dir)
    context = tokenizer(humaneval_prompts(1, offset=seed)[0]).input_ids
    greedy = SamplingParams()
    incremental = factory.new_session(context, greedy)
    for _ in range(12):
        k = rng.randint(1, 6)
        draft = incremental.propose(context, k).token_ids
        fresh = factory.new_session(context, greedy).propose(context, k).token_ids
        assert draft == fresh
        num_accepted = rng.randint(0, k)
        correction = rng.randrange(1, 4096)
        if num_accepted < k and correction == draft[num_accepted]:
            correction = (correction + 1) % 4096
        incremental.update(num_accepted)
        context = context + draft[:num_accepted] + [correction]
    incremental.close()


def test_seeded_sampled_draft_uses_the_targets_uniforms(factory):
    # A seeded session draws each token with the (seed, position) uniform the target uses
    # there: the same draft from any session of that seed, no q (the verifier checks one-hot).
    sampling = SamplingParams(temperature=0.8, seed=3)
    drafts = [factory.new_session([1, 2, 3], sampling).propose([1, 2, 3, 4, 5], 4) for _ in range(2)]
    assert drafts[0].token_ids == drafts[1].token_ids and drafts[0].draft_probs is None
    others = [factory.new_session([1, 2, 3], SamplingParams(temperature=0.8, seed=s)).propose([1, 2, 3, 4, 5], 4)
              for s in (4, 5, 6, 7)]  # fmt: skip
    assert any(o.token_ids != drafts[0].token_ids for o in others)


def test_unseeded_sampled_draft_returns_q(factory):
    # An unseeded sampled draft carries q rows that are distributions and give each drafted token mass.
    proposer = factory.new_session([1, 2, 3], SamplingParams(temperature=0.8))
    draft = proposer.propose([1, 2, 3, 4, 5], 4)
    assert draft.draft_probs is not None and draft.draft_probs.shape == (4, 4096)
    assert ((draft.draft_probs.sum(-1) - 1).abs() < 1e-4).all()
    assert all(draft.draft_probs[i, t] > 0 for i, t in enumerate(draft.token_ids))
