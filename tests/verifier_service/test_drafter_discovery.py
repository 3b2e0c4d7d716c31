"""`DrafterFollower.sync` choosing a drafter pool from the registry (no models, in-memory
store; a real Redis and real processes are in tests/integration/test_drafter_registry.py)."""

from __future__ import annotations

import pytest

from shared.registry import replica_key
from shared.store import MemoryStore, StoreRunner
from verifier_service import drafter_discovery
from verifier_service.drafter_discovery import DrafterFollower

TOK = "tok-hash"


class FakeServicer:
    def __init__(self) -> None:
        self.store = StoreRunner(MemoryStore(1000))
        self.tokenizer_hash = TOK
        self.drafter_address: str | None = None
        self.drafter_channel = object()
        self.connected: list[str] = []

    def connect_drafter(self, address: str) -> None:
        self.drafter_address = address
        self.connected.append(address)


@pytest.fixture
def servicer():
    s = FakeServicer()
    yield s
    s.store.close()


def announce(servicer: FakeServicer, address: str, tok: str = TOK) -> None:
    servicer.store.submit(servicer.store.store.set_ex, replica_key("drafter", tok, address), b"1", 60).result(2)


def forget(servicer: FakeServicer, address: str) -> None:
    servicer.store.submit(servicer.store.store.delete, replica_key("drafter", TOK, address)).result(2)


async def test_follows_a_live_reachable_pool(servicer, monkeypatch):
    up: set[str] = set()
    monkeypatch.setattr(drafter_discovery, "reachable", lambda _channel: servicer.drafter_address in up)
    follower = DrafterFollower(servicer)

    announce(servicer, "other-tokenizer:1", tok="another-hash")  # serves other targets
    assert await follower.sync() is None and servicer.connected == []

    announce(servicer, "a:1")
    up.add("a:1")
    assert await follower.sync() == "a:1"
    assert await follower.sync() == "a:1"  # live and reachable: stays
    assert servicer.connected == ["a:1"]

    up.discard("a:1")  # killed: key still live, channel dead, nothing else: keep it (k = 0)
    assert await follower.sync() == "a:1" and servicer.connected == ["a:1"]

    announce(servicer, "b:2")  # a replacement appears: move to it
    up.add("b:2")
    assert await follower.sync() == "b:2"
    assert servicer.connected == ["a:1", "b:2"]

    announce(servicer, "c:3")
    up.add("c:3")
    forget(servicer, "b:2")  # heartbeat gone (even if it still answers): move
    assert await follower.sync() == "c:3"


async def test_start_looks_once_before_serving(servicer, monkeypatch):
    monkeypatch.setattr(drafter_discovery, "reachable", lambda _channel: True)
    announce(servicer, "a:1")
    follower = DrafterFollower(servicer, poll_s=60)
    await follower.start()
    try:
        assert servicer.connected == ["a:1"]
    finally:
        follower.close()
