"""Drafter pools in the replica registry on a real Redis (`drafter_service.__main__`,
`verifier_service.drafter_discovery`): a pool process announces itself under its tokenizer
hash; a verifier started with only the Redis URL (no --drafter) finds it and drafts through
it exactly; after the pool is killed a new one on another port takes over without
restarting the verifier; a pool that stops cleanly leaves the registry at once."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest

from shared.loading import load_tokenizer, tokenizer_hash
from shared.paths import models_dir
from shared.pb.specdec.v1 import verifier_pb2, verifier_pb2_grpc
from shared.registry import discover
from shared.store import REDIS_URL_ENV, RedisStore
from tests.exactness import compare_greedy, humaneval_prompts
from tests.grpc_servers import spawn_service, wait_serving
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow

TARGET = "codelm-target-s"
MAX_NEW_TOKENS = 32


def pools(url: str) -> dict[str, set[str]]:
    async def look() -> dict[str, set[str]]:
        store = RedisStore(url)
        try:
            return await discover(store, "drafter")
        finally:
            await store.close()

    return asyncio.run(look())


def wait_for_pools(url: str, expected: dict[str, set[str]], timeout: float = 5.0) -> None:
    """The first beat is sent as the pool goes SERVING, not before: poll for it."""
    deadline = time.monotonic() + timeout
    while (found := pools(url)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert found == expected


def draft(address: str, prompt: list[int]):
    """A greedy draft_model request: (tokens, stats)."""
    request = verifier_pb2.VerifierGenerateRequest(
        model=TARGET, prompt_token_ids=prompt, max_new_tokens=MAX_NEW_TOKENS, method="draft_model",
        num_speculative_tokens=4,
    )  # fmt: skip
    tokens, stats = [], None
    with grpc.insecure_channel(address) as channel:
        for resp in verifier_pb2_grpc.VerifierServiceStub(channel).Generate(request, timeout=120):
            kind = resp.WhichOneof("response")
            assert kind != "error", resp.error
            if kind == "chunk":
                tokens.extend(resp.chunk.token_ids)
            else:
                stats = resp.complete.stats
    return tokens, stats


def wait_for_log(proc, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in Path(proc.log_path).read_text():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{text!r} not logged in {timeout} s:\n{Path(proc.log_path).read_text()[-2000:]}")


def test_a_verifier_finds_and_follows_drafter_pools(tmp_path, monkeypatch):
    server = RedisServer(tmp_path)
    monkeypatch.setenv(REDIS_URL_ENV, server.url)  # the only thing the processes are told
    tok_hash = tokenizer_hash(models_dir() / TARGET)
    tok = load_tokenizer(models_dir() / TARGET)
    prompts = [tok(p).input_ids for p in humaneval_prompts(2)]
    procs = []
    try:
        first, first_port = spawn_service("drafter_service")
        procs.append(first)
        first_address = f"127.0.0.1:{first_port}"
        wait_serving(first_address)
        wait_for_pools(server.url, {tok_hash: {first_address}})

        verifier, verifier_port = spawn_service("verifier_service", "--target", TARGET)
        procs.append(verifier)
        address = f"127.0.0.1:{verifier_port}"
        wait_serving(address)  # its first look at the registry is part of its start-up
        tokens, stats = draft(address, prompts[0])
        assert compare_greedy(TARGET, prompts[0], tokens, MAX_NEW_TOKENS).ok
        assert stats.num_accepted_tokens > 0

        # killed: its key outlives it (TTL), but its channel is dead, so the verifier moves
        first.kill()
        first.wait(10)
        second, second_port = spawn_service("drafter_service")
        procs.append(second)
        second_address = f"127.0.0.1:{second_port}"
        assert second_port != first_port
        wait_serving(second_address)
        wait_for_log(verifier, f"drafting through pool {second_address} (")
        tokens, stats = draft(address, prompts[1])
        assert compare_greedy(TARGET, prompts[1], tokens, MAX_NEW_TOKENS).ok
        assert stats.num_accepted_tokens > 0

        second.send_signal(signal.SIGTERM)  # a clean stop deletes its key at once
        assert second.wait(30) == 0
        assert second_address not in pools(server.url).get(tok_hash, set())
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        server.stop()
