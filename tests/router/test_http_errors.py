"""Every HTTP error the router's OpenAI API returns has OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` and the right status, with no exception
text or internal address in it; limits answer before work is done (a real `Router` with
one target and no replica, driven in process through ASGI)."""

from __future__ import annotations

import json

import httpx
import pytest

from router.http import create_app
from router.server import Router
from router.validation import ModelSpec
from shared.config import RequestLimits

LIMITS = RequestLimits(max_body_bytes=4096, max_prompt_chars=200, max_stop_strings=2, max_stop_chars=8)
SPEC = ModelSpec("m", max_context=256, max_new_tokens=64, vocab_size=4096, methods=("none", "ngram"))


def _tokenize(model: str, text: str) -> list[int]:
    return [ord(c) % 4096 for c in text]


@pytest.fixture
async def client():
    app = create_app(Router([SPEC], _tokenize, limits=LIMITS))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as c:
        yield c


def _body(**fields) -> dict:
    return {"model": "m", "prompt": "def f(x):", "max_tokens": 4, **fields}


CASES = [
    # (method, path, request kwargs, status, param)
    ("GET", "/no/such/path", {}, 404, None),
    ("GET", "/v1/completions", {}, 405, None),
    ("POST", "/v1/completions", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None),
    ("POST", "/v1/completions", {"content": b"x" * 5000}, 413, None),
    ("POST", "/v1/completions", {"json": _body(model="nope")}, 404, "model"),
    ("POST", "/v1/completions", {"json": _body(prompt="a" * 201)}, 400, "prompt"),
    ("POST", "/v1/completions", {"json": _body(prompt="")}, 400, "prompt"),
    ("POST", "/v1/completions", {"json": _body(stop=["a", "b", "c"])}, 400, "stop"),
    ("POST", "/v1/completions", {"json": _body(stop="x" * 9)}, 400, "stop"),
    ("POST", "/v1/completions", {"json": _body(top_p=1e-50)}, 400, "top_p"),
    ("POST", "/v1/completions", {"json": _body(top_p=0)}, 400, "top_p"),
    ("POST", "/v1/completions", {"json": _body(temperature=-1)}, 400, "temperature"),
    ("POST", "/v1/completions", {"json": _body(max_tokens=0)}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"json": _body(method="beam")}, 400, "method"),
    ("POST", "/v1/completions", {"json": _body(num_speculative_tokens=99)}, 400, "num_speculative_tokens"),
    ("POST", "/v1/completions", {"json": _body(n=2)}, 400, "n"),
    # a valid request with no verifier replica: 503, not a stack trace
    ("POST", "/v1/completions", {"json": _body()}, 503, "model"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "param"), CASES)
async def test_errors_have_openai_shape(client, method, path, kwargs, status, param):
    response = await client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert "Traceback" not in error["message"] and "127.0.0.1" not in error["message"]


async def test_lone_surrogate_is_a_400_not_a_500(client):
    raw = json.dumps(_body()).replace("def f(x):", "\\ud800").encode()
    response = await client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


async def test_chunked_body_over_the_limit_is_a_413(client):
    async def chunks():
        for _ in range(10):
            yield b"x" * 1000

    response = await client.post("/v1/completions", content=chunks())
    assert response.status_code == 413


async def test_router_still_answers_after_bad_input(client):
    for method, path, kwargs, _, _ in CASES:
        await client.request(method, path, **kwargs)
    assert (await client.get("/v1/models")).status_code == 200
