"""Fixtures of the store tests: a real `redis-server` per module, and a store runner on
each backend (in memory and on that Redis) for tests that hold for both."""

from __future__ import annotations

import pytest

from shared.store import MemoryStore, RedisStore, StoreRunner
from tests.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def runner(request, redis_server):
    store = MemoryStore() if request.param == "memory" else RedisStore(redis_server.url)
    running = StoreRunner(store)
    yield running
    running.close()
