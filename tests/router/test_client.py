"""`router.client` against a real router with a real in-process verifier (codelm-target-s):
blocking and asyncio results equal, typed errors, API key sent, retries before the first
token only (that it imports without torch: tests/router/test_no_torch.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import pytest_asyncio

from router.client import AsyncSpecdecClient, Chunk, ClientError, Completion, SpecdecClient
from router.server import Router, start_grpc_server
from shared.config import AuthConfig, default_config
from shared.loading import tokenizer_hash
from tests.grpc_servers import start_verifier_server
from verifier_service.engine import load_target
from verifier_service.loop import SpecDecodeLoop
from verifier_service.policy import RulePolicy
from verifier_service.servicer import VerifierServicer

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

TARGET = "codelm-target-s"
CONFIG = default_config().model_copy(update={"drafters": []})
KEY = "sk-client-test"


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def address(monkeypatch_module):
    engine, tokenizer = load_target(CONFIG.target(TARGET), max_batch_rows=4)
    servicer = VerifierServicer(CONFIG, TARGET)
    servicer.attach(SpecDecodeLoop(engine, tokenizer, RulePolicy(CONFIG.speculation)),
                    tokenizer_hash(CONFIG.target(TARGET).model_dir))  # fmt: skip
    verifier = await start_verifier_server(servicer)
    monkeypatch_module.setenv("SPECDEC_API_KEY", KEY)
    router = Router.from_config(CONFIG.model_copy(update={"auth": AuthConfig()}))
    await router.add_replica(TARGET, verifier.address)
    server = await start_grpc_server(router, "127.0.0.1", 0)
    await server.set_serving(True)
    yield f"127.0.0.1:{server.port}"
    await server.server.stop(None)
    await router.close()
    await verifier.stop(None)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


# NOTE: the router runs in this test's event loop, so blocking calls go to a thread


async def test_blocking_and_async_give_the_same_typed_result(address):
    with SpecdecClient(address) as client:  # the key comes from SPECDEC_API_KEY
        items = await asyncio.to_thread(
            lambda: list(client.stream(TARGET, "def add(a, b):", max_new_tokens=12, method="ngram"))
        )
        assert all(isinstance(i, Chunk) for i in items[:-1]) and isinstance(items[-1], Completion)
        done = items[-1]
        assert done.token_ids == [t for c in items[:-1] for t in c.token_ids]
        assert done.finish_reason in ("stop", "length") and done.completion_tokens == len(done.token_ids)
        assert "mean_acceptance_length" in done.stats
        assert TARGET in [m.name for m in await asyncio.to_thread(client.models)]
    async with AsyncSpecdecClient(address) as client:
        again = await client.generate(TARGET, "def add(a, b):", max_new_tokens=12, method="ngram")
    assert again.token_ids == done.token_ids  # greedy: the same tokens either way


async def test_errors_are_typed_and_name_the_field(address):
    async with AsyncSpecdecClient(address) as client:
        with pytest.raises(ClientError) as e:
            await client.generate("nope", "x")
        assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.field == "model"
        with pytest.raises(ClientError) as e:
            await client.generate(TARGET, "x", temperature=-1.0)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.field == "temperature"
    with SpecdecClient(address, api_key="wrong") as client:
        with pytest.raises(ClientError) as e:
            await asyncio.to_thread(client.models)
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_retries_only_before_the_first_token():
    # nothing listens there: UNAVAILABLE on every attempt, retried `attempts` times, then raised
    client = SpecdecClient("127.0.0.1:9", attempts=2, timeout_s=5)
    with pytest.raises(ClientError) as e:
        client.generate(TARGET, "x")
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    client.close()
