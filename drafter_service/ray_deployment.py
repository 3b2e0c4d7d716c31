"""The drafter pool as a Ray Serve deployment (`router.ray_app` binds it).

A replica loads the pool and serves the bidirectional `DrafterService.Draft` stream over its
own gRPC server on the replica's node (a Serve handle carries request/response and
server-streaming calls, not the two-way stream a draft session needs). Verifiers ask the
deployment for an address (`address()`, a handle call) and open their streams there.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class DrafterPoolReplica:
    async def __init__(self, config: dict) -> None:  # type: ignore[misc]  # Serve awaits async constructors
        import asyncio

        import ray

        from drafter_service.pool import DrafterPool
        from drafter_service.servicer import DrafterServicer
        from shared.config import SpecdecConfig
        from shared.pb.specdec.v1 import drafter_pb2_grpc
        from shared.serving import grpc_server
        from shared.tls import internal_server_credentials

        cfg = SpecdecConfig.model_validate(config)
        pool = await asyncio.get_running_loop().run_in_executor(
            None, lambda: DrafterPool.load(cfg.drafters, cfg.targets)
        )
        self.server = grpc_server(cfg.limits)
        self.servicer = DrafterServicer(pool)
        drafter_pb2_grpc.add_DrafterServiceServicer_to_server(self.servicer, self.server)
        credentials = internal_server_credentials(cfg.tls)
        listen = "0.0.0.0:0"
        port = self.server.add_secure_port(listen, credentials) if credentials else self.server.add_insecure_port(listen)
        await self.server.start()
        self._address = f"{ray.util.get_node_ip_address()}:{port}"
        logger.info("drafter pool replica serving Draft on %s (%s)", self._address, pool.drafter_names)

    def address(self) -> str:
        """host:port of this replica's Draft stream."""
        return self._address

    def placement(self) -> dict[str, str]:
        """Where this replica runs (operators, tests): Ray node id and actor name."""
        import ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "actor_name": context.get_actor_name()}

    def check_health(self) -> None:
        if self.servicer.pool is None:
            raise RuntimeError("the drafter pool is not loaded")

    async def __del__(self) -> None:
        await self.server.stop(5)
        if self.servicer.pool is not None:
            self.servicer.pool.shutdown()
