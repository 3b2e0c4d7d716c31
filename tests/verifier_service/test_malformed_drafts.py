"""A faulty drafter (ids outside the vocabulary, draft_probs of the wrong shape, NaN or
unnormalised q) costs speculation, never the request or its exactness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.config import default_config
from shared.proposer import Draft
from shared.sampling import SamplingParams
from shared.types import GenerationRequest
from verifier_service.draft_client import decode_draft_probs
from verifier_service.engine import load_target
from verifier_service.loop import SpecDecodeLoop
from verifier_service.policy import RulePolicy

CONFIG = default_config()
TARGET = "codelm-target-s"


class FaultyProposer:
    """Proposes what `make(k, vocab)` returns every round (a drafter gone wrong)."""

    def __init__(self, make, vocab: int) -> None:
        self.make, self.vocab, self.closed = make, vocab, False

    def propose(self, context_ids, k: int) -> Draft:
        return self.make(k, self.vocab)

    def update(self, num_accepted: int) -> None:
        pass

    def set_params(self, params) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def loop():
    engine, tokenizer = load_target(CONFIG.target(TARGET))
    return SpecDecodeLoop(engine, tokenizer, RulePolicy(CONFIG.speculation))


FAULTS = {
    "id at vocab size": lambda k, v: Draft(token_ids=[v] * k),
    "negative id": lambda k, v: Draft(token_ids=[-1] * k),
    "q of another vocabulary": lambda k, v: Draft(token_ids=[1] * k, draft_probs=torch.full((k, v + 1), 1 / (v + 1))),
    "q with fewer rows": lambda k, v: Draft(token_ids=[1] * k, draft_probs=torch.full((max(0, k - 1), v), 1 / v)),
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_malformed_drafts_are_dropped(loop, fault, temperature):
    prompt = loop.tokenizer("def add(a, b):\n").input_ids
    sampling = SamplingParams(temperature=temperature, seed=7 if temperature else None)
    request = GenerationRequest(prompt_ids=prompt, max_new_tokens=16, sampling=sampling, method="draft_model")
    proposer = FaultyProposer(FAULTS[fault], loop.engine.vocab_size)
    *_, result = loop.generate(request, proposer)
    plain = GenerationRequest(prompt_ids=prompt, max_new_tokens=16, sampling=sampling, method="none")
    *_, expected = loop.generate(plain, None)
    assert result.token_ids == expected.token_ids  # same seed, no draft ever used
    assert result.stats.num_draft_tokens == 0
    assert proposer.closed


@pytest.mark.parametrize(
    "rows",
    [
        [[0.5, 0.5, float("nan")]],
        [[1.5, -0.5, 0.0]],
        [[0.2, 0.2, 0.2]],  # sums to 0.6
        [[float("inf"), 0.0, 0.0]],
    ],
)
def test_draft_probs_that_are_not_distributions_are_refused(rows):
    data = np.asarray(rows, dtype="<f4").tobytes()
    with pytest.raises(ValueError):
        decode_draft_probs(data, len(rows), len(rows[0]))


def test_draft_probs_round_trip():
    q = np.asarray([[0.25, 0.75, 0.0], [1.0, 0.0, 0.0]], dtype="<f4")
    out = decode_draft_probs(q.tobytes(), 2, 3)
    assert torch.equal(out, torch.from_numpy(q))
