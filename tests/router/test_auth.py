"""API keys and per-key rate limits on both public transports: 401 / UNAUTHENTICATED in the
usual shapes, /health and gRPC health open, 429 with Retry-After, keys never logged."""

from __future__ import annotations

import logging

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.auth import API_KEY_ENV, Gatekeeper, bearer_token, key_id, load_api_keys
from router.http import create_app
from router.server import Router, start_grpc_server
from router.validation import ModelSpec
from shared.config import AuthConfig
from shared.errors import RateLimitedError, UnauthenticatedError
from shared.pb.specdec.v1 import router_pb2, router_pb2_grpc

KEY = "sk-test-0123456789"
SPEC = ModelSpec("m", max_context=256, max_new_tokens=64, vocab_size=4096, methods=("none",))


def make_router(monkeypatch, rate_limit: str | None = None, **auth) -> Router:
    monkeypatch.setenv(API_KEY_ENV, f"{KEY}, other-key")
    return Router([SPEC], lambda m, t: [1, 2], auth=AuthConfig(rate_limit=rate_limit, **auth))


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (f"Bearer {KEY}", True),
        (f"bearer   {KEY} ", True),
        ("Bearer other-key", True),
        (None, False),
        ("", False),
        ("Bearer", False),
        (f"Basic {KEY}", False),
        (f"Bearer {KEY}x", False),
        (f"Bearer {KEY[:-1]}", False),
    ],
)
def test_authenticate_table(header, ok):
    gate = Gatekeeper([KEY, "other-key"])
    if ok:
        assert gate.authenticate(header).startswith("key-")
    else:
        with pytest.raises(UnauthenticatedError):
            gate.authenticate(header)


def test_keys_from_env_and_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# ops keys\nfile-key-1\n\nfile-key-2  # rotated monthly\n")
    keys = load_api_keys(AuthConfig(api_key_file=path), {API_KEY_ENV: "env-a,env-b,"})
    assert keys == ["env-a", "env-b", "file-key-1", "file-key-2"]
    assert load_api_keys(AuthConfig(), {}) == []  # none: the API is open
    assert Gatekeeper([]).authenticate(None) is None
    assert bearer_token("Bearer  abc ") == "abc" and key_id("abc") != "abc"


def test_rate_limit_per_key_with_retry_after():
    gate = Gatekeeper([KEY, "other-key"], rate_limit="2/minute")
    gate.admit(f"Bearer {KEY}", "c")
    gate.admit(f"Bearer {KEY}", "c")
    with pytest.raises(RateLimitedError) as e:
        gate.admit(f"Bearer {KEY}", "c")
    assert 1 <= e.value.retry_after_s <= 60
    gate.admit("Bearer other-key", "c")  # another key has its own window


async def test_http_needs_a_key_health_does_not(monkeypatch, caplog):
    app = create_app(make_router(monkeypatch))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    caplog.set_level(logging.DEBUG)
    async with httpx.AsyncClient(transport=transport, base_url="http://r") as c:
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
        # authentication comes before body validation: a bad body without a key is still 401
        assert (await c.post("/v1/completions", json={})).status_code == 401
        assert (await c.get("/v1/models", headers={"authorization": "Bearer wrong"})).status_code == 401
        assert (await c.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})).status_code == 200
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/metrics", headers={"authorization": f"Bearer {KEY}"})).status_code == 200
        assert (await c.get("/health")).status_code in (200, 503)  # open (503: no replica)
    assert KEY not in caplog.text


async def test_http_rate_limit_is_429_with_retry_after(monkeypatch):
    app = create_app(make_router(monkeypatch, rate_limit="1/minute", protect_metrics=False))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    headers = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://r", headers=headers) as c:
        assert (await c.get("/v1/models")).status_code == 200
        r = await c.get("/v1/models")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert (await c.get("/metrics")).status_code == 200  # unprotected by config


async def test_grpc_needs_a_key_health_does_not(monkeypatch):
    router = make_router(monkeypatch)
    server = await start_grpc_server(router, "127.0.0.1", 0)
    await server.set_serving(True)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = router_pb2_grpc.GenerationServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ListModels(router_pb2.ListModelsRequest())
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in stub.Generate(router_pb2.GenerateRequest(model="m", text="x", max_new_tokens=2)):
                    pass
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            models = await stub.ListModels(router_pb2.ListModelsRequest(), metadata=(("authorization", f"Bearer {KEY}"),))
            assert [m.name for m in models.models] == ["m"]
            health = health_pb2_grpc.HealthStub(channel)
            assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.server.stop(None)


async def test_cli_sends_the_key_from_the_environment(monkeypatch):
    from router.client import SpecdecClient

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert SpecdecClient("127.0.0.1:1").metadata == ()
    monkeypatch.setenv(API_KEY_ENV, f" {KEY} ,other-key")
    assert SpecdecClient("127.0.0.1:1").metadata == (("authorization", f"Bearer {KEY}"),)


async def test_both_transports_tell_the_verifier_whose_request_it_is(monkeypatch):
    """The caller's key id travels as the verifier request's tenant (its shared draft state)."""
    router = make_router(monkeypatch)  # no verifier replica: each request ends 503 / UNAVAILABLE
    validated = []
    validate = router.validate
    monkeypatch.setattr(router, "validate", lambda request: validated.append(validate(request)) or validated[-1])
    transport = httpx.ASGITransport(app=create_app(router))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2},
                              headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.status_code == 503
    server = await start_grpc_server(router, "127.0.0.1", 0)
    await server.set_serving(True)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = router_pb2_grpc.GenerationServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in stub.Generate(router_pb2.GenerateRequest(model="m", text="x", max_new_tokens=2),
                                             metadata=(("authorization", "Bearer other-key"),)):  # fmt: skip
                    pass
    finally:
        await server.server.stop(None)
    assert [v.to_verifier().tenant for v in validated] == [key_id(KEY), key_id("other-key")]
    assert Gatekeeper([]).caller(f"Bearer {KEY}") == ""  # keys off: everyone's
