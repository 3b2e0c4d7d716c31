"""The replica registry on a real Redis (`shared.registry`, `router.discovery`): a verifier
process started with SPECDEC_REDIS_URL announces itself and two routers, neither told about
it, both find it and serve through it; it leaves the registry when it stops, and a replica
whose heartbeat stops (a killed process) expires."""

from __future__ import annotations

import asyncio
import signal

import pytest

from router.discovery import RegistryWatcher
from router.server import Router
from shared.config import default_config
from shared.registry import Heartbeat, discover, replica_key
from shared.store import REDIS_URL_ENV, RedisStore
from tests.grpc_servers import spawn_service, wait_serving
from tests.redis_server import RedisServer

TARGET = "codelm-target-s"


async def test_a_killed_replica_expires(tmp_path):
    server = RedisServer(tmp_path)
    store = RedisStore(server.url)
    try:
        beat = Heartbeat(store, "verifier", TARGET, "10.0.0.7:5000", ttl_s=0.6)
        beat.start()
        await asyncio.sleep(0.1)
        assert await discover(store, "verifier") == {TARGET: {"10.0.0.7:5000"}}
        beat._task.cancel()  # killed: no delete, the key just stops being renewed
        await asyncio.sleep(1.0)
        assert await discover(store, "verifier") == {}
        clean = Heartbeat(store, "verifier", TARGET, "10.0.0.8:5000")
        clean.start()
        await asyncio.sleep(0.1)
        await clean.stop()  # a clean stop deletes at once
        assert await discover(store, "verifier") == {}
        await store.client.set(replica_key("verifier", "odd", ""), b"1")  # malformed: no address
        assert await discover(store, "verifier") == {}
    finally:
        await store.close()
        server.stop()


@pytest.mark.slow
async def test_two_routers_find_a_verifier_through_the_registry(tmp_path, monkeypatch):
    server = RedisServer(tmp_path)
    monkeypatch.setenv(REDIS_URL_ENV, server.url)
    proc, port = spawn_service("verifier_service", "--target", TARGET)
    address = f"127.0.0.1:{port}"
    config = default_config()
    routers = [Router.from_config(config) for _ in range(2)]
    watchers = [RegistryWatcher(r, RedisStore(server.url), poll_s=0.1) for r in routers]
    try:
        await asyncio.get_running_loop().run_in_executor(None, wait_serving, address)
        for watcher in watchers:
            await watcher.sync()
        for router in routers:
            (replica,) = router.registry.replicas(TARGET)
            assert replica.address == address and replica.healthy
            assert "ngram" in replica.methods  # its GetLoad answered
        proc.send_signal(signal.SIGTERM)  # a clean stop deletes its key
        await asyncio.get_running_loop().run_in_executor(None, proc.wait, 60)
        for watcher, router in zip(watchers, routers):
            await watcher.sync()
            assert router.registry.replicas(TARGET) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for watcher, router in zip(watchers, routers):
            await watcher.close()
            await router.close()
        server.stop()
