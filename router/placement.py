"""The router's placement rule, one for both hosts: the process router's `ReplicaRegistry`
(gRPC verifiers) and `router.ray_routing.LeastLoadedRouter` (Serve replicas of a verifier
deployment).

A request goes to the replica with the smallest *share* of its capacity in use, not the
smallest count: verifier replicas may differ in batch rows + queue (a GPU replica next to a
CPU one), and a share compares them fairly. Replicas with no room are left out; equal
shares form one tier, within which the host breaks ties (the registry rotates, Serve picks
the shortest queue it knows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

R = TypeVar("R")


def load_share(in_flight: float, capacity: int) -> float:
    """The share of a replica's capacity in use (≥ 1: full)."""
    return in_flight / capacity if capacity > 0 else float("inf")


def rank_by_load(replicas: Sequence[R], share: Callable[[R], float]) -> list[list[R]]:
    """Replicas with room, in tiers of equal load share, least loaded first (order within a
    tier kept)."""
    tiers: dict[float, list[R]] = {}
    for replica in replicas:
        s = share(replica)
        if s < 1.0:
            tiers.setdefault(s, []).append(replica)
    return [tiers[s] for s in sorted(tiers)]
