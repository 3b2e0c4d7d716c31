"""Boilerplate every gRPC service's `__main__` shares: health, port announcement, SIGTERM.

Process contract (what `specdec serve` and tests rely on):
  - the first stdout line is `LISTENING <port>` once the port is bound (port 0 = any free
    port), printed before the models load;
  - the standard health service (`grpc.health.v1.Health`) answers NOT_SERVING for the
    overall status ("") and the service's own name until the models are loaded, then SERVING;
  - SIGTERM or SIGINT: health goes NOT_SERVING, the server stops accepting new RPCs, and
    in-flight ones get `grace` seconds to finish (`await server.stop(grace)`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )


class HealthReporter:
    """Health servicer plus the service names it reports for."""

    def __init__(self, server: grpc.aio.Server, service_names: Sequence[str]) -> None:
        self.servicer = health.aio.HealthServicer()
        self.names = ["", *service_names]
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in self.names:
            await self.servicer.set(name, status)


def announce_port(port: int, label: str = "LISTENING") -> None:
    """`LISTENING <port>` on stdout (flushed) for a parent process to read."""
    print(f"{label} {port}", flush=True)


def stop_event() -> asyncio.Event:
    """Set on SIGTERM or SIGINT (call from inside the running event loop)."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


async def start_server(
    server: grpc.aio.Server,
    service_name: str,
    host: str,
    port: int,
    metrics_port: int | None,
) -> tuple[HealthReporter, int, asyncio.Event]:
    """Health at NOT_SERVING, bind, start, announce the port, metrics, SIGTERM event.

    Returns (health, bound port, stop event); the caller loads its models, sets health
    to serving, waits for the event and drains.
    """
    health = HealthReporter(server, [service_name])
    await health.set(False)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    announce_port(bound)
    if metrics_port is not None:
        from shared.metrics import start_metrics_server

        logging.getLogger(service_name).info(
            "metrics on http://%s:%d/metrics", host, start_metrics_server(metrics_port, host)
        )
    return health, bound, stop_event()


async def wait_shielded(fut: asyncio.Future, logger: logging.Logger, what: str) -> None:
    """Wait for cleanup `fut` to finish even if the caller is cancelled again meanwhile.

    Cancelled streams must still free their session (close the loop, the proposer, the
    drafter's state) before the handler returns; a failure there is logged, not raised.
    """
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError:
        await fut
        raise
    except Exception:  # noqa: BLE001
        logger.exception("%s failed", what)
