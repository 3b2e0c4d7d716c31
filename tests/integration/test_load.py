"""200 concurrent requests through the real processes (`specdec serve` on its default batch
rows and queue, one target): every one completes, none is refused, the verifier batched
them (its `specdec:batch_rows` histogram) and queued the ones beyond its rows."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from router.stack import metric_samples
from tests.exactness import humaneval_prompts
from tests.integration.conftest import ONE_TARGET

pytestmark = pytest.mark.slow

TARGET = ONE_TARGET
NUM_REQUESTS = 200


async def test_two_hundred_concurrent_requests_all_complete(one_target_stack):
    stack = one_target_stack
    prompts = humaneval_prompts(164)  # all of HumanEval; the rest get a distinct first line
    limits = httpx.Limits(max_connections=NUM_REQUESTS)
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=300, limits=limits) as client:

        async def one(i: int) -> httpx.Response:
            prompt = f"# request {i}\n" + prompts[i % len(prompts)][-300:]
            body = {"model": TARGET, "prompt": prompt, "max_tokens": 16, "temperature": 0,
                    "method": "ngram" if i % 2 else "none"}  # fmt: skip
            return await client.post("/v1/completions", json=body)

        responses = await asyncio.gather(*(one(i) for i in range(NUM_REQUESTS)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == NUM_REQUESTS, {s: statuses.count(s) for s in set(statuses)}
    assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in responses)
    text = stack.metrics(TARGET)
    steps = sum(metric_samples(text, "specdec:batch_rows_count", model=TARGET))
    rows = sum(metric_samples(text, "specdec:batch_rows_sum", model=TARGET))
    assert rows / steps > 4, (rows, steps)  # many requests shared each step
    queued = sum(metric_samples(text, "specdec:queue_time_seconds_count", model=TARGET))
    assert queued >= NUM_REQUESTS  # every request went through the queue
