"""Process wiring: `specdec serve` (router + spawned services) and `python -m router`.

`specdec serve` runs the router in this process and spawns, as subprocesses (exec, never a
bare fork after gRPC starts), one drafter-pool process and then one verifier process per
configured target, all on loopback:

    python -m drafter_service --port 0 --metrics-port 0 [--config cfg.yaml]
    python -m verifier_service --target NAME --drafter 127.0.0.1:<drafter port> --port 0 ...

Each child prints `METRICS <port>` and `LISTENING <port>` on stdout once its /metrics and
gRPC ports are bound (both asked for as port 0 at the first start, so no port is picked by
one process and bound by another); the router then waits for its
gRPC health to be SERVING, registers the verifiers as replicas and starts serving gRPC (with
health and reflection) and OpenAI-compatible HTTP in one asyncio loop. A child that exits
while serving is restarted on the same port (verifiers keep their drafter address, the
router keeps its replica entry; requests degrade to k = 0 while the drafter is away).

SIGTERM/SIGINT: health goes NOT_SERVING, new requests are refused, in-flight requests
drain for up to `--grace-period` seconds, children get SIGTERM (SIGKILL after a timeout), and
the process exits 0.

`--state-file PATH` writes JSON with the bound ports and every child's pid, port and metrics
port (rewritten after a restart); tests and operators read it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shared.serving import (
    PARENT_PID_ENV,
    add_common_arguments,
    announce_port,
    configure_logging,
    load_config_or_exit,
    stop_event,
)

if TYPE_CHECKING:
    from router.server import Router
    from shared.config import SpecdecConfig, StoreConfig

logger = logging.getLogger("specdec.serve")

CHILD_START_TIMEOUT_S = 180.0  # model loading on a busy 2-core machine
CHILD_STOP_TIMEOUT_S = 15.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(False)
    return sock


# ---------------------------------------------------------------- router in this process


async def run_router(
    router: Router,
    *,
    host: str,
    port: int,
    http_port: int | None,
    stop: asyncio.Event,
    grace_s: float,
    on_ready: Callable[[int, int | None], None] | None = None,
    store: StoreConfig | None = None,
) -> None:
    """Serve gRPC (+ HTTP when `http_port` is not None) until `stop`, then drain. With a
    Redis `store`, verifier replicas are also found in its registry (`router.discovery`)."""
    import uvicorn

    from router.discovery import watch_registry
    from router.http import create_app
    from router.server import start_grpc_server

    grpc_server = await start_grpc_server(router, host, port)
    http_server = None
    http_task = None
    bound_http = None
    if http_port is not None:
        sock = _bind(host, http_port)
        bound_http = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(router),
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=max(1, int(grace_s)),
            lifespan="off",
            # HTTPS with the public certificate when one is configured
            ssl_certfile=str(router.tls.cert_file) if router.tls.cert_file else None,
            ssl_keyfile=str(router.tls.key_file) if router.tls.key_file else None,
        )
        http_server = _embedded_uvicorn(config)
        http_task = asyncio.get_running_loop().create_task(http_server.serve(sockets=[sock]))
        while not http_server.started:
            if http_task.done():
                http_task.result()  # raises the startup error
            await asyncio.sleep(0.01)
    router.start_polling()
    watcher = watch_registry(router, store) if store is not None else None
    await grpc_server.set_serving(True)
    if on_ready is not None:
        on_ready(grpc_server.port, bound_http)
    await stop.wait()

    logger.info("draining: %d request(s) in flight, grace %.0fs", router.num_in_flight, grace_s)
    router.draining = True
    await grpc_server.set_serving(False)
    if http_server is not None:
        http_server.should_exit = True
    # grpc: refuses new RPCs at once, waits up to grace for in-flight ones, then cancels them.
    await asyncio.gather(
        grpc_server.server.stop(grace_s),
        router.wait_idle(grace_s),
        *(t for t in (http_task,) if t is not None),
    )
    if watcher is not None:
        await watcher.close()
    await router.close()


def _embedded_uvicorn(config):
    """A uvicorn.Server that leaves signals to us (its own handler re-raises SIGTERM on exit)."""
    import uvicorn

    class EmbeddedServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return EmbeddedServer(config)


# ---------------------------------------------------------------- children


@dataclass
class Child:
    role: str  # "drafter" | "verifier"
    name: str  # target name; "pool" for the drafter
    argv: list[str]  # without --port / --metrics-port
    port: int = 0  # 0 until the first LISTENING line; then fixed across restarts
    metrics_port: int = 0  # likewise, from the METRICS line
    pid: int = 0
    restarts: int = 0
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)
    stdout_task: asyncio.Task | None = field(default=None, repr=False)
    credentials: object = field(default=None, repr=False)  # mTLS for its health checks, if any

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def state(self) -> dict:
        return {
            "role": self.role, "name": self.name, "address": self.address, "port": self.port,
            "metrics_port": self.metrics_port, "pid": self.pid, "restarts": self.restarts,
        }  # fmt: skip


async def start_child(child: Child, timeout: float = CHILD_START_TIMEOUT_S) -> None:
    """Spawn the child, read its `LISTENING <port>` line, wait for health SERVING."""
    argv = [*child.argv, "--port", str(child.port), "--metrics-port", str(child.metrics_port)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env[PARENT_PID_ENV] = str(os.getpid())  # the child ends itself if this process dies
    logger.info("starting %s %s: %s", child.role, child.name, " ".join(argv))
    process = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        env=env,
    )  # fmt: skip
    child.process = process
    child.pid = process.pid
    try:
        await _await_listening(child, process, timeout)
    except BaseException:
        # Startup failed or we were cancelled (shutdown during a restart): leave no orphan.
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        raise
    logger.info("%s %s serving on %s (pid %d)", child.role, child.name, child.address, child.pid)


async def _await_listening(child: Child, process: asyncio.subprocess.Process, timeout: float) -> None:
    from router.server import wait_for_health

    deadline = time.monotonic() + timeout
    port = None
    assert process.stdout is not None
    while port is None:
        remaining = deadline - time.monotonic()
        try:
            line = await asyncio.wait_for(process.stdout.readline(), max(remaining, 0.01))
        except asyncio.TimeoutError:
            raise TimeoutError(f"{child.role} {child.name}: no LISTENING line after {timeout:.0f}s") from None
        if not line:
            rc = await process.wait()
            raise RuntimeError(f"{child.role} {child.name} exited with {rc} before LISTENING")
        text = line.decode(errors="replace").strip()
        if text.startswith("LISTENING "):
            port = int(text.split()[1])
        elif text.startswith("METRICS "):
            child.metrics_port = int(text.split()[1])
        elif text:
            logger.info("[%s %s] %s", child.role, child.name, text)
    child.port = port
    child.stdout_task = asyncio.get_running_loop().create_task(_pump(child, process.stdout))
    await wait_for_health(child.address, max(deadline - time.monotonic(), 1.0), credentials=child.credentials)


async def _pump(child: Child, stream: asyncio.StreamReader) -> None:
    # Keep reading so a chatty child never blocks on a full pipe.
    while line := await stream.readline():
        logger.info("[%s %s] %s", child.role, child.name, line.decode(errors="replace").rstrip())


async def stop_child(child: Child, timeout: float = CHILD_STOP_TIMEOUT_S) -> int | None:
    process = child.process
    if process is None or process.returncode is not None:
        return None if process is None else process.returncode
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        rc = await asyncio.wait_for(process.wait(), timeout)
    except asyncio.TimeoutError:
        logger.warning("%s %s ignored SIGTERM; killing", child.role, child.name)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        rc = await process.wait()
    if child.stdout_task is not None:
        child.stdout_task.cancel()
    return rc


# ---------------------------------------------------------------- the embedded stack


class ServeStack:
    """Drafter pool + one verifier per target as children; the router in this process."""

    def __init__(
        self,
        config: SpecdecConfig,
        config_path: str | None,
        *,
        grace_s: float = 30.0,
        state_file: str | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.grace_s = grace_s
        self.state_file = Path(state_file) if state_file else None
        cfg = ["--config", config_path] if config_path else []
        # no drafters configured: no pool (verifiers serve `none` and `ngram`)
        self.drafter = Child("drafter", "pool", ["-m", "drafter_service", *cfg]) if config.drafters else None
        self.verifiers = [
            Child("verifier", t.name, ["-m", "verifier_service", "--target", t.name, *cfg])
            for t in config.targets
            for _ in range(t.replicas)
        ]
        self.ports: dict[str, int | None] = {}
        self.stopping = False
        self._supervisors: list[asyncio.Task] = []

    @property
    def children(self) -> list[Child]:
        return [self.drafter, *self.verifiers] if self.drafter else list(self.verifiers)

    async def start_children(self) -> None:
        from shared.tls import internal_channel_credentials

        credentials = internal_channel_credentials(self.config.tls)  # files read once
        for child in self.children:
            child.credentials = credentials
        if self.drafter is not None:
            await start_child(self.drafter)
            for v in self.verifiers:
                v.argv += ["--drafter", self.drafter.address]
        # Verifiers load their targets concurrently.
        await asyncio.gather(*(start_child(v) for v in self.verifiers))

    def write_state(self) -> None:
        if self.state_file is None:
            return
        state = {
            "pid": os.getpid(),
            "grpc_port": self.ports.get("grpc"),
            "http_port": self.ports.get("http"),
            "children": [c.state() for c in self.children],
        }
        tmp = self.state_file.with_suffix(self.state_file.suffix + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    async def _supervise(self, child: Child) -> None:
        """Restart a child that dies while we are serving (same port, same args)."""
        backoff = 0.5
        while not self.stopping:
            assert child.process is not None
            rc = await child.process.wait()
            if self.stopping:
                return
            logger.warning("%s %s (pid %d) exited with %s; restarting", child.role, child.name,
                           child.pid, rc)  # fmt: skip
            await asyncio.sleep(backoff)
            try:
                await start_child(child)
                child.restarts += 1
                backoff = 0.5
                self.write_state()
            except Exception as e:  # noqa: BLE001 - keep supervising; log and back off
                logger.error("restarting %s %s failed: %s", child.role, child.name, e)
                backoff = min(backoff * 2, 10.0)
                if child.process is None or child.process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.process.kill()

    async def run(self, port: int, http_port: int | None, stop: asyncio.Event) -> None:
        from router.server import Router

        try:
            router_task = asyncio.get_running_loop().run_in_executor(
                None, Router.from_config, self.config
            )  # the tokenizer loads while the children load their models
            await self.start_children()
            router = await router_task
            for v in self.verifiers:
                await router.add_replica(v.name, v.address)
            loop = asyncio.get_running_loop()
            self._supervisors = [loop.create_task(self._supervise(c)) for c in self.children]

            def ready(grpc_port: int, bound_http: int | None) -> None:
                self.ports = {"grpc": grpc_port, "http": bound_http}
                self.write_state()
                _announce_ports(grpc_port, bound_http)
                logger.info("specdec serving: gRPC %d, HTTP %s", grpc_port, bound_http)

            await run_router(
                router, host=self.config.host, port=port, http_port=http_port, stop=stop,
                grace_s=self.grace_s, on_ready=ready, store=self.config.store,
            )  # fmt: skip
        finally:
            self.stopping = True
            for task in self._supervisors:
                task.cancel()
            # Verifiers first: they are the drafter pool's clients.
            t0 = time.monotonic()
            rcs = await asyncio.gather(*(stop_child(c) for c in self.verifiers))
            names = [c.name for c in self.verifiers]
            if self.drafter is not None:
                rcs.append(await stop_child(self.drafter))
                names.append(self.drafter.name)
            logger.info("children stopped in %.1fs: %s", time.monotonic() - t0, dict(zip(names, rcs)))


# ---------------------------------------------------------------- entry points


def _announce_ports(grpc_port: int, http_port: int | None) -> None:
    """`LISTENING <grpc port>`, then `HTTP <port>` when HTTP is served, for a parent to read."""
    announce_port(grpc_port)
    if http_port is not None:
        announce_port(http_port, "HTTP")


def _router_ports(args: argparse.Namespace, config: SpecdecConfig) -> tuple[int, int | None]:
    """The gRPC and HTTP (None: off) ports: the flags over the config's."""
    port = config.router_port if args.port is None else args.port
    http_port = None if args.no_http else (config.http_port if args.http_port is None else args.http_port)
    return port, http_port


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--port", type=int, help="public gRPC port (default: config router_port)")
    parser.add_argument("--http-port", type=int, help="HTTP port (default: config http_port)")
    parser.add_argument("--no-http", action="store_true", help="serve gRPC only")
    parser.add_argument("--grace-period", type=float, default=30.0,
                        help="seconds in-flight requests may take to drain on SIGTERM")  # fmt: skip
    parser.add_argument("--state-file", help="write ports and child pids here as JSON")


def serve_main(args: argparse.Namespace) -> int:
    """`specdec serve`."""
    configure_logging(args.log_level)
    config = load_config_or_exit(args.config)
    if args.host:
        config = config.model_copy(update={"host": args.host})
    port, http_port = _router_ports(args, config)
    with contextlib.ExitStack() as cleanup:
        if args.redis:
            from shared.store import REDIS_URL_ENV, redis_url

            if not redis_url(config.store):
                # children inherit the URL through the environment
                os.environ[REDIS_URL_ENV] = cleanup.enter_context(local_redis_server())
            logger.info("store: Redis at %s", redis_url(config.store))
        if args.ray:
            from router.ray_app import serve_on_ray

            serve_on_ray(args.config, config.host, http_port or config.http_port, port, state_file=args.state_file)
            return 0
        stack = ServeStack(config, args.config, grace_s=args.grace_period, state_file=args.state_file)

        async def main() -> None:
            stop = stop_event()
            await stack.run(port, http_port, stop)

        asyncio.run(main())
    return 0


@contextlib.contextmanager
def local_redis_server():
    """A `redis-server` from PATH on a free loopback port, without persistence, for one run
    of `specdec serve --redis`; yields its URL."""
    import shutil
    import subprocess
    import tempfile

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("--redis: no SPECDEC_REDIS_URL or store.redis_url, and no redis-server on PATH")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="specdec-redis-") as directory:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory, "--save", "",
             "--appendonly", "no", "--maxmemory", "512mb", "--maxmemory-policy", "volatile-lru"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("--redis: redis-server did not start") from None
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(10)


def router_main(argv: Sequence[str] | None = None) -> int:
    """`python -m router`: the router alone, against running verifiers."""
    parser = argparse.ArgumentParser(prog="python -m router", description=router_main.__doc__)
    add_serve_arguments(parser)
    parser.add_argument("--verifier", action="append", default=[], metavar="NAME=HOST:PORT",
                        help="a verifier replica of target NAME (repeatable)")  # fmt: skip
    parser.add_argument("--health-timeout", type=float, default=60.0,
                        help="seconds to wait for each verifier to be SERVING")  # fmt: skip
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    from router.server import Router, parse_verifier_flags, wait_for_health
    from shared.tls import internal_channel_credentials

    config = load_config_or_exit(args.config)
    try:
        verifiers: Mapping[str, list[str]] = parse_verifier_flags(args.verifier)
    except ValueError as e:
        parser.error(str(e))
    unknown = set(verifiers) - {t.name for t in config.targets}
    if unknown:
        parser.error(f"--verifier names targets not in the config: {sorted(unknown)}")
    port, http_port = _router_ports(args, config)
    host = args.host or config.host

    async def main() -> None:
        stop = stop_event()
        router = Router.from_config(config)
        for name, addresses in verifiers.items():
            for address in addresses:
                await wait_for_health(address, args.health_timeout,
                                      credentials=internal_channel_credentials(config.tls))  # fmt: skip
                await router.add_replica(name, address)

        def ready(grpc_port: int, bound_http: int | None) -> None:
            _announce_ports(grpc_port, bound_http)
            if args.state_file:
                Path(args.state_file).write_text(
                    json.dumps({"pid": os.getpid(), "grpc_port": grpc_port, "http_port": bound_http})
                )

        await run_router(router, host=host, port=port, http_port=http_port, stop=stop,
                         grace_s=args.grace_period, on_ready=ready, store=config.store)  # fmt: skip

    asyncio.run(main())
    return 0
