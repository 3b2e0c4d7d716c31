"""The router's placement rule (`router.placement`) as Ray Serve's request router for every
verifier deployment (`request_router_config` in `router.ray_app`).

Serve's default (power of two choices) compares two random replicas by the requests *this
handle* has sent them. Ours ranks every replica of the deployment by the share of its
capacity in use, taking the larger of two counts: the handle's own (Serve's queue-length
cache, fresh per request) and the replica's own report (`VerifierReplica.record_routing_stats`:
rows running plus queued, whoever sent them; several router replicas share one verifier).
Serve then picks the shortest known queue within the first tier that accepts; ties at
random.
"""

from __future__ import annotations

import random

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

from router.placement import load_share, rank_by_load


class LeastLoadedRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        def share(replica: RunningReplica) -> float:
            sent = self.replica_queue_len_cache.get(replica.replica_id) or 0
            reported = replica.routing_stats.get("in_flight", 0)
            return load_share(max(sent, reported), replica.max_ongoing_requests)

        tiers = rank_by_load(candidate_replicas, share)
        for tier in tiers:
            # Serve takes the first shortest queue of a tier: without a shuffle, equally
            # loaded replicas would always lose to the same one (the registry rotates instead)
            random.shuffle(tier)
        # NOTE: all full: still offer them, least loaded first; Serve probes and backs off
        # until one accepts (its queue-length protocol), as with its own router
        return tiers or [sorted(candidate_replicas, key=share)]
