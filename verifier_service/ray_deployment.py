"""One target's verifier as a Ray Serve deployment (`router.ray_app` binds one per target).

A replica is the same `VerifierServicer` as `python -m verifier_service` (one step loop,
continuous batching, the request queue), reached through Serve handles instead of its own
gRPC port, so Serve's autoscaler sees every ongoing request: `generate` takes a serialized
`VerifierGenerateRequest` and streams serialized `GenerateResponse`s, and a status the
servicer would abort a gRPC call with travels in-band as `("abort", code, details,
trailing metadata)`, which the router's `router.handles.HandleStub` raises as the same
`grpc.aio.AioRpcError`. The replica finds the drafter pool through its handle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from shared.errors import status_to_int
from verifier_service.drafter_discovery import reachable

logger = logging.getLogger(__name__)

_END = object()
FOLLOW_DRAFTER_S = 2.0


class _Aborted(Exception):
    pass


class _StreamContext:
    """The two methods of a gRPC servicer context `VerifierServicer.Generate` uses."""

    def __init__(self) -> None:
        self.items: asyncio.Queue = asyncio.Queue()

    async def write(self, message) -> None:
        await self.items.put(message.SerializeToString())

    async def abort(self, code, details: str, trailing_metadata=()) -> None:
        await self.items.put(("abort", status_to_int(code), details, tuple(trailing_metadata)))
        raise _Aborted


class VerifierReplica:
    async def __init__(self, config: dict, target: str, drafter=None) -> None:  # type: ignore[misc]
        from shared.config import SpecdecConfig
        from verifier_service.servicer import VerifierServicer

        cfg = SpecdecConfig.model_validate(config)
        address = await drafter.address.remote() if drafter is not None else None
        self.servicer = VerifierServicer(cfg, target, drafter_address=address)
        self.servicer.store.check()  # down = degraded; wrong credentials raise: the replica fails to start
        await asyncio.get_running_loop().run_in_executor(None, self.servicer.load)
        self._follower = asyncio.get_running_loop().create_task(self._follow(drafter)) if drafter else None
        logger.info("verifier replica of %r ready (drafter %s)", target, address or "none")

    async def _follow(self, drafter) -> None:
        """Serve restarts a dead drafter-pool replica elsewhere, on another port: ask the
        deployment for its address every few seconds and reconnect when it changed (until
        then, model methods run with k = 0)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(FOLLOW_DRAFTER_S)
            # NOTE: only a pool we cannot reach is replaced: with several pool replicas the
            # handle answers with any one of them, and a working stream stays where it is
            if await loop.run_in_executor(None, reachable, self.servicer.drafter_channel):
                continue
            try:
                address = await asyncio.wait_for(drafter.address.remote(), FOLLOW_DRAFTER_S)
            except Exception as e:  # noqa: BLE001 - no replica yet: ask again later
                logger.debug("drafter pool address: %s", e)
                continue
            if address != self.servicer.drafter_address:
                logger.info("drafter pool moved to %s: reconnecting", address)
                self.servicer.connect_drafter(address)

    async def generate(self, request: bytes) -> AsyncIterator[bytes | tuple]:
        from shared.pb.specdec.v1 import verifier_pb2

        context = _StreamContext()
        task = asyncio.get_running_loop().create_task(
            self._run(verifier_pb2.VerifierGenerateRequest.FromString(request), context)
        )
        try:
            while (item := await context.items.get()) is not _END:
                yield item
        finally:
            task.cancel()  # the router went away: the servicer cancels the row

    async def _run(self, request, context: _StreamContext) -> None:
        try:
            await self.servicer.Generate(request, context)
        except _Aborted:
            pass
        finally:
            context.items.put_nowait(_END)

    async def get_load(self) -> bytes:
        from shared.pb.specdec.v1 import verifier_pb2

        response = await self.servicer.GetLoad(verifier_pb2.GetLoadRequest(), None)
        return response.SerializeToString()

    def record_routing_stats(self) -> dict[str, int]:
        """What `router.ray_routing.LeastLoadedRouter` ranks this replica by: its rows and
        queued requests, from every router (Serve polls it every second)."""
        return {"in_flight": self.servicer.active_sessions}

    def placement(self) -> dict[str, str]:
        """Where this replica runs (operators, tests): Ray node id and actor name."""
        import ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "actor_name": context.get_actor_name()}

    def check_health(self) -> None:
        if not self.servicer.ready:
            raise RuntimeError("the verifier is not loaded")

    def __del__(self) -> None:
        self.servicer.close()
