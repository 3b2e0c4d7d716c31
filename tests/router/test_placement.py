"""The placement rule shared by the process router and the Ray request router."""

from __future__ import annotations

import pytest

from router.placement import load_share, rank_by_load
from router.server import ReplicaRegistry
from shared.errors import ResourceExhaustedError


def test_rank_by_load_orders_by_share_of_capacity_not_count():
    # (name, in flight, capacity): b runs more requests but has the most room
    replicas = [("a", 3, 4), ("b", 8, 32), ("c", 2, 8), ("d", 1, 4), ("full", 4, 4)]
    tiers = rank_by_load(replicas, lambda r: load_share(r[1], r[2]))
    assert [[r[0] for r in tier] for tier in tiers] == [["b", "c", "d"], ["a"]]


def test_a_replica_without_capacity_is_never_ranked():
    assert rank_by_load([("x", 0, 0)], lambda r: load_share(r[1], r[2])) == []


async def test_registry_fills_replicas_by_share_and_refuses_when_all_are_full():
    registry = ReplicaRegistry()
    small = registry.add("m", "127.0.0.1:1", max_sessions=2)
    large = registry.add("m", "127.0.0.1:2", max_sessions=6)
    picks = [registry.acquire("m") for _ in range(8)]
    assert picks.count(small) == 2 and picks.count(large) == 6
    # the shares stayed even while filling: the small one never ran ahead of the large one
    assert picks[:4].count(large) == 3
    with pytest.raises(ResourceExhaustedError, match="at capacity"):
        registry.acquire("m")
    registry.release(small)
    assert registry.acquire("m") is small
    await registry.close()
