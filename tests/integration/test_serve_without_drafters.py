"""`specdec serve` with no drafters configured runs no drafter pool: model-free methods
answer exactly, a model method is refused with a clear error."""

from __future__ import annotations

import httpx
import pytest

from router.stack import ServeProcess
from shared.config import default_config
from tests.exactness import compare_greedy, humaneval_prompts, load_reference_model

S = "codelm-target-s"


@pytest.mark.slow
def test_serve_without_drafters(tmp_path):
    base = default_config().model_dump(mode="json")
    config = dict(base, targets=[t for t in base["targets"] if t["name"] == S], drafters=[], router_port=0, http_port=0)
    stack = ServeProcess(tmp_path, config)
    stack.start()
    try:
        assert [c["name"] for c in stack.state["children"]] == [S]
        _, tokenizer = load_reference_model(S)
        prompt = tokenizer(humaneval_prompts(1, offset=5)[0]).input_ids
        for method in ("none", "ngram"):
            body = {"model": S, "prompt": prompt, "max_tokens": 24, "temperature": 0, "method": method}
            r = httpx.post(f"{stack.http_url}/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert compare_greedy(S, prompt, r.json()["specdec"]["token_ids"], 24).ok
        body = {"model": S, "prompt": prompt, "max_tokens": 24, "temperature": 0, "method": "draft_model"}
        r = httpx.post(f"{stack.http_url}/v1/completions", json=body, timeout=120)
        assert 400 <= r.status_code < 500 and "draft_model" in r.json()["error"]["message"], r.text
    finally:
        assert stack.stop() == 0, stack.log_tail()
