"""Property-based fuzzing of the public request paths (hypothesis): OpenAI HTTP bodies drawn
from the app's own OpenAPI schema (and arbitrary JSON), and public gRPC `GenerateRequest`s
drawn from the message descriptor. Whatever arrives: no 500, no exception other than the
domain errors, an OpenAI-shaped error body, and the router answers a valid request after.

`SPECDEC_FUZZ_EXAMPLES` sets the number of cases per property (CI: a small sample).
"""

from __future__ import annotations

import asyncio
import json
import math
import os

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from router.http import create_app
from router.server import Router
from router.validation import ModelSpec, validate_request
from shared.errors import SpecdecError
from shared.pb.specdec.v1 import router_pb2
from tests.proto_strategies import messages

EXAMPLES = int(os.environ.get("SPECDEC_FUZZ_EXAMPLES", "150"))
SPEC = ModelSpec("m", max_context=256, max_new_tokens=64, vocab_size=4096, methods=("none", "ngram"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


def _tokenize(model: str, text: str) -> list[int]:
    return [ord(c) % 4096 for c in text][:300]


APP = create_app(Router([SPEC], _tokenize))
SCHEMA = APP.openapi()["components"]["schemas"]["CompletionRequest"]
SCHEMA_WITH_DEFS = {**SCHEMA, "components": APP.openapi()["components"]}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _cheap(body: dict) -> dict:
    """Keep generated completions short (a valid body would reach a verifier)."""
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 8)
    return body


bodies = from_schema(SCHEMA_WITH_DEFS).map(_cheap) | json_values


def _post(body) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=APP, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as c:
            raw = json.dumps(body, allow_nan=True).encode()
            return await c.post("/v1/completions", content=raw, headers={"content-type": "application/json"})

    return asyncio.run(go())


@FUZZ
@given(body=bodies)
def test_http_bodies_never_500(body):
    response = _post(body)
    assert response.status_code != 500, (body, response.text)
    assert response.status_code in (400, 404, 413, 422, 429, 503), (body, response.status_code)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
sampling = st.builds(dict, temperature=floats, top_p=floats, top_k=st.integers(-(2**31), 2**31 - 1),
                     seed=st.none() | st.integers(-(2**63), 2**63 - 1))  # fmt: skip
requests = st.builds(
    dict,
    model=st.sampled_from(["m", "", "nope"]) | st.text(max_size=8),
    text=st.none() | st.text(max_size=60),
    token_ids=st.none() | st.lists(st.integers(-(2**31), 2**31 - 1), max_size=40),
    max_new_tokens=st.integers(-(2**31), 2**31 - 1),
    method=st.sampled_from(["", "none", "ngram", "draft_model", "sorted", "beam"]),
    stop=st.lists(st.text(max_size=12), max_size=6),
    k=st.none() | st.integers(-(2**31), 2**31 - 1),
    sampling=sampling,
)


def _message(r: dict) -> router_pb2.GenerateRequest | None:
    try:
        msg = router_pb2.GenerateRequest(model=r["model"], max_new_tokens=r["max_new_tokens"], method=r["method"],
                                         stop=r["stop"])  # fmt: skip
        if r["text"] is not None:
            msg.text = r["text"]
        elif r["token_ids"] is not None:
            msg.token_ids.SetInParent()
            msg.token_ids.token_ids.extend(r["token_ids"])
        if r["k"] is not None:
            msg.num_speculative_tokens = r["k"]
        s = r["sampling"]
        msg.sampling.temperature, msg.sampling.top_p, msg.sampling.top_k = s["temperature"], s["top_p"], s["top_k"]
        if s["seed"] is not None:
            msg.sampling.seed = s["seed"]
    except (ValueError, UnicodeEncodeError):
        return None  # not representable on the wire (e.g. a lone surrogate): the transport's job
    return msg


@FUZZ
@given(r=requests)
def test_grpc_requests_get_a_domain_error_or_pass(r):
    msg = _message(r)
    if msg is None:
        return
    try:
        v = validate_request(msg, {"m": SPEC}, _tokenize)
    except SpecdecError as e:
        assert e.message
        return
    # what passes is within every bound the verifier relies on
    assert 0 < len(v.prompt_ids) < SPEC.max_context and all(0 <= t < SPEC.vocab_size for t in v.prompt_ids)
    assert 0 < v.max_new_tokens <= SPEC.max_new_tokens and len(v.prompt_ids) + v.max_new_tokens <= SPEC.max_context
    assert math.isfinite(v.sampling.temperature) and v.sampling.temperature >= 0
    assert 0 < v.sampling.top_p <= 1 and v.sampling.top_k >= 0


def test_router_answers_after_fuzzing():
    assert _post({"model": "m", "prompt": "def f(x):", "max_tokens": 4}).status_code == 503  # no replica: ok


@FUZZ
@given(msg=messages(router_pb2.GenerateRequest))
def test_any_generate_request_from_the_descriptor(msg):
    """Any field combination the wire can carry: a domain error or a request within bounds."""
    try:
        v = validate_request(msg, {"m": SPEC}, _tokenize)
    except SpecdecError:
        return
    assert 0 < v.max_new_tokens <= SPEC.max_new_tokens and len(v.prompt_ids) + v.max_new_tokens <= SPEC.max_context
