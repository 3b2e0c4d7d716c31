"""A faulty drafter (ids outside the vocabulary) costs speculation, never the request or
its exactness; a q (draft_probs) of any shape is never read (drafts are verified one-hot)."""

from __future__ import annotations

import pytest

from shared.config import default_config
from shared.proposer import Draft
from shared.sampling import SamplingParams
from shared.types import GenerationRequest
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
