"""Boilerplate every gRPC service's `__main__` shares: health, port announcement, SIGTERM.

Process contract (what `specdec serve` and tests rely on):
  - with `--metrics-port`, `METRICS <port>` once /metrics is served (port 0 = any free
    port), then `LISTENING <port>` once the gRPC port is bound (port 0 likewise), both
    printed before the models load;
  - the standard health service (`grpc.health.v1.Health`) answers NOT_SERVING for the
    overall status ("") and the service's own name until the models are loaded, then SERVING;
  - SIGTERM or SIGINT: health goes NOT_SERVING, the server stops accepting new RPCs, and
    in-flight ones get `grace` seconds to finish (`await server.stop(grace)`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shared.tls import add_port

if TYPE_CHECKING:
    from shared.config import RequestLimits

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
T = TypeVar("T")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every process entry point takes (router, verifier, drafter pool)."""
    parser.add_argument("--config", help="SpecdecConfig YAML (default: the embedded demo config)")
    parser.add_argument("--host", help="bind address (default: the config's host)")
    parser.add_argument("--log-level", default="INFO")


def add_service_arguments(parser: argparse.ArgumentParser, default_port: int, default_grace: float) -> None:
    """Common flags plus those of a gRPC service process (verifier, drafter pool)."""
    add_common_arguments(parser)
    parser.add_argument("--port", type=int, default=default_port, help="gRPC port; 0 = any free port")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (off if unset; 0 = any)")
    parser.add_argument("--grace", type=float, default=default_grace,
                        help="seconds to drain in-flight work on SIGTERM")  # fmt: skip


PARENT_PID_ENV = "SPECDEC_PARENT_PID"


def die_with_parent() -> None:
    """A child of `specdec serve` (SPECDEC_PARENT_PID set) gets SIGTERM when that parent dies,
    even by SIGKILL, so no verifier or drafter outlives its router (Linux PR_SET_PDEATHSIG;
    set here in the child, because a pre-exec hook in the threaded parent can deadlock)."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def grpc_server(limits: RequestLimits, interceptors: Sequence = ()) -> grpc.aio.Server:
    """A grpc.aio server whose transport refuses messages over twice the application's
    limit (RESOURCE_EXHAUSTED, which callers must not retry as a full replica); messages
    between the two limits reach the handler, which answers INVALID_ARGUMENT naming them."""
    limit = 2 * limits.max_message_bytes
    return grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit)], interceptors=list(interceptors)
    )


CONFIG_ERROR_EXIT = 2


def load_config_or_exit(path: str | None):
    """The config every entry point starts from; a bad file (missing, not YAML, invalid)
    is one clear line on stderr and exit status 2, not a traceback."""
    import yaml
    from pydantic import ValidationError

    from shared.config import SpecdecConfig

    try:
        return SpecdecConfig.load(path)
    except (OSError, yaml.YAMLError, ValidationError, ValueError) as e:
        print(f"configuration error in {path}: {e}", file=sys.stderr)
        raise SystemExit(CONFIG_ERROR_EXIT) from None


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
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
    """`<label> <port>` on stdout (flushed) for a parent process to read."""
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
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[HealthReporter, int, asyncio.Event]:
    """Health at NOT_SERVING, metrics (announced), bind, start, announce the port, SIGTERM event.

    Returns (health, bound port, stop event); the caller loads its models, sets health
    to serving, waits for the event and drains.
    """
    health = HealthReporter(server, [service_name])
    await health.set(False)
    if metrics_port is not None:
        from shared.metrics import start_metrics_server

        # NOTE: bound here (port 0: any) and announced, not picked free by a parent and
        # bound later: in between, a sibling's gRPC port 0 took that port once and the
        # child died with EADDRINUSE
        metrics_port = start_metrics_server(metrics_port, host)
        announce_port(metrics_port, "METRICS")
        logging.getLogger(service_name).info("metrics on http://%s:%d/metrics", host, metrics_port)
    bound = add_port(server, f"{host}:{port}", credentials)
    await server.start()
    announce_port(bound)
    return health, bound, stop_event()


async def run_service(
    server: grpc.aio.Server,
    service_name: str,
    host: str,
    port: int,
    metrics_port: int | None,
    load: Callable[[], T],
    on_loaded: Callable[[T, int], Awaitable[None] | None],
    grace: float,
    credentials: grpc.ServerCredentials | None = None,
) -> T | None:
    """The life of a gRPC service process: start (health NOT_SERVING, `LISTENING <port>`),
    run `load` (blocking: models) in an executor, hand its result and the bound port to
    `on_loaded`, go SERVING, wait for SIGTERM/SIGINT, go NOT_SERVING and drain for
    `grace` seconds. A stop during loading skips straight to the drain. Returns what `load`
    returned (None if stopped first); exceptions from `load`/`on_loaded` propagate after
    the server stops."""
    health, bound, stop = await start_server(server, service_name, host, port, metrics_port, credentials)
    die_with_parent()  # after the SIGTERM handler is installed: a parent's death drains us
    loaded = asyncio.get_running_loop().run_in_executor(None, load)
    stopped = asyncio.ensure_future(stop.wait())
    result = None
    try:
        done, _ = await asyncio.wait([loaded, stopped], return_when=asyncio.FIRST_COMPLETED)
        if loaded in done:
            result = loaded.result()
            ready = on_loaded(result, bound)
            if ready is not None:
                await ready
            await health.set(True)
            await stop.wait()
        logging.getLogger(service_name).info("draining (grace %.1f s)", grace)
    finally:
        stopped.cancel()
        await health.set(False)
        await server.stop(grace)
    return result


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
