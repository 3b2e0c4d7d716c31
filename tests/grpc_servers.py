"""In-process grpc.aio servers on 127.0.0.1 for service tests (real servicers, real models)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.paths import PROJECT_ROOT
from shared.pb.specdec.v1 import drafter_pb2_grpc, verifier_pb2_grpc


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    servicer: object

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)


async def start_drafter_server(pool, port: int = 0) -> RunningServer:
    from drafter_service.servicer import DrafterServicer

    servicer = DrafterServicer(pool)
    server = grpc.aio.server()
    drafter_pb2_grpc.add_DrafterServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return RunningServer(server, bound, servicer)


async def start_verifier_server(servicer, port: int = 0) -> RunningServer:
    server = grpc.aio.server()
    verifier_pb2_grpc.add_VerifierServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return RunningServer(server, bound, servicer)


@contextlib.asynccontextmanager
async def verifier_replicas(config, target: str, engine, tokenizer, speculation, num: int = 2):
    """`num` verifier replicas of `target` on loopback, each its own servicer (its own store
    connection) over a 2-row copy of `engine`; stopped and closed on exit."""
    from shared.loading import tokenizer_hash
    from verifier_service.loop import SpecDecodeLoop
    from verifier_service.policy import RulePolicy
    from verifier_service.servicer import VerifierServicer

    tok_hash = tokenizer_hash(config.target(target).model_dir)
    servicers, running = [], []
    try:
        for _ in range(num):
            servicers.append(VerifierServicer(config, target))
            servicers[-1].attach(SpecDecodeLoop(engine.resized(2), tokenizer, RulePolicy(speculation)), tok_hash)
            running.append(await start_verifier_server(servicers[-1]))
        yield running
    finally:
        for server in running:
            await server.stop(None)
        for servicer in servicers:
            servicer.close()


async def generate_complete(stub, request):
    """The `complete` message of a verifier Generate stream (an in-band error fails)."""
    async for resp in stub.Generate(request):
        assert resp.WhichOneof("response") != "error", resp.error
        if resp.WhichOneof("response") == "complete":
            return resp.complete
    raise AssertionError("the stream ended without a complete message")


async def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


# ---------------------------------------------------------------- subprocesses


def spawn_service(module: str, *args: str, port: int = 0) -> tuple[subprocess.Popen, int]:
    """`python -m module --port PORT ...`; returns the process and the port it announced."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # NOTE: stderr goes to a file, not a pipe nobody drains (a full pipe would block the service).
    log = tempfile.NamedTemporaryFile(prefix=f"{module}-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--port", str(port), *args],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    proc.log_path = log.name
    proc.metrics_port = None  # from a `METRICS <port>` line (with --metrics-port)
    line = proc.stdout.readline()
    if line.startswith("METRICS "):
        proc.metrics_port = int(line.split()[1])
        line = proc.stdout.readline()
    if not line.startswith("LISTENING "):
        proc.kill()
        proc.wait()
        with open(log.name) as f:
            raise RuntimeError(f"{module} did not announce a port: {line!r}\n{f.read()[-2000:]}")
    return proc, int(line.split()[1])


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


def wait_serving(address: str, timeout: float = 60.0) -> list[int]:
    """Poll health until SERVING; returns every status seen (NOT_SERVING first, usually)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = health_status(address)
        except grpc.RpcError:
            time.sleep(0.05)
            continue
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == health_pb2.HealthCheckResponse.SERVING:
            return seen
        time.sleep(0.05)
    raise TimeoutError(f"{address} not SERVING after {timeout} s (seen {seen})")
