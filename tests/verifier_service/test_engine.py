"""The served engine (lean, batched) and the reference engine (HF, row by row) behind the same
loop: the same greedy tokens for rows that share steps, and slots are reused."""

from __future__ import annotations

import pytest

from shared.config import default_config
from shared.ngram import NgramProposerFactory
from shared.types import GenerationRequest
from tests.exactness import humaneval_prompts
from verifier_service.engine import HFEngine, TargetEngine, load_target
from verifier_service.loop import SpecDecodeLoop
from verifier_service.policy import RulePolicy

pytestmark = pytest.mark.slow

CONFIG = default_config()
TARGET = "codelm-target-s"


def run_batch(engine, tokenizer, requests):
    loop = SpecDecodeLoop(engine, tokenizer, RulePolicy(CONFIG.speculation), max_step_tokens=48)
    ngram = NgramProposerFactory(CONFIG.ngram)
    results = loop.run_together(
        [(r, ngram.new_session(r.prompt_ids, r.sampling) if r.method == "ngram" else None) for r in requests]
    )
    assert engine.num_free == engine.max_batch_rows  # every slot back
    return [r.token_ids for r in results]


def test_lean_and_reference_engines_agree_in_a_batch():
    lean, tokenizer = load_target(CONFIG.target(TARGET), max_batch_rows=3)
    reference, _ = load_target(CONFIG.target(TARGET), max_batch_rows=3, reference=True)
    assert isinstance(lean, TargetEngine) and isinstance(reference, HFEngine)
    prompts = [tokenizer(p).input_ids for p in humaneval_prompts(5, offset=40)]
    requests = [GenerationRequest(prompt_ids=p, max_new_tokens=12 + 4 * i, method=("none", "ngram")[i % 2])
                for i, p in enumerate(prompts)]  # fmt: skip
    # 5 requests on 3 rows: the last two run in slots the first three freed
    out_lean = run_batch(lean, tokenizer, requests[:3]) + run_batch(lean, tokenizer, requests[3:])
    out_ref = run_batch(reference, tokenizer, requests[:3]) + run_batch(reference, tokenizer, requests[3:])
    assert out_lean == out_ref
