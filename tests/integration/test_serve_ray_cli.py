"""`specdec serve --ray`, the user's path to the Ray Serve application on one machine: it
comes up, answers exactly over HTTP and gRPC, and a SIGTERM in the middle of a stream
drains it (the stream completes) before the process exits 0."""

from __future__ import annotations

import concurrent.futures

import pytest

from router.stack import ServeProcess
from shared.config import default_config
from tests.exactness import compare_greedy, humaneval_prompts, load_reference_model
from tests.sse import streamed_token_ids

pytest.importorskip("ray.serve")
S = "codelm-target-s"


@pytest.mark.slow
def test_specdec_serve_ray_answers_exactly_and_drains_on_sigterm(tmp_path):
    from router.client import SpecdecClient

    base = default_config().model_dump(mode="json")
    config = dict(base, targets=[t for t in base["targets"] if t["name"] == S], drafters=[])
    stack = ServeProcess(tmp_path, config, ray=True)
    stack.start()
    try:
        _, tokenizer = load_reference_model(S)
        prompt = tokenizer(humaneval_prompts(1, offset=3)[0]).input_ids
        with SpecdecClient(stack.grpc_address) as client:
            done = client.generate(S, prompt, max_new_tokens=24, method="ngram")
        assert compare_greedy(S, prompt, done.token_ids, 24).ok

        started = concurrent.futures.Future()
        body = {"model": S, "prompt": prompt, "max_tokens": 400, "temperature": 0, "stream": True}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            tokens = pool.submit(streamed_token_ids, f"{stack.http_url}/v1/completions", body, started)
            assert started.result(120)
            assert stack.stop(timeout=120) == 0, stack.log_tail()
            assert compare_greedy(S, prompt, tokens.result(60), 400).ok
    finally:
        stack.kill()
