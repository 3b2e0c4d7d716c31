"""Reading the OpenAI HTTP API's server-sent events in tests."""

from __future__ import annotations

import concurrent.futures
import json

import httpx


def sse_events(response: httpx.Response):
    """The JSON events of a streaming response, up to `data: [DONE]`."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            if data == "[DONE]":
                return
            yield json.loads(data)


def streamed_token_ids(url: str, body: dict, started: concurrent.futures.Future) -> list[int]:
    """POST a streaming completion to `url`; the token ids of all its events (none may be
    an error). `started` is set at the first event, so a test can act mid-stream."""
    tokens: list[int] = []
    with httpx.stream("POST", url, json=body, timeout=300) as response:
        assert response.status_code == 200
        for event in sse_events(response):
            assert "error" not in event, event
            tokens += event.get("specdec", {}).get("token_ids", [])
            if not started.done():
                started.set_result(True)
    return tokens
