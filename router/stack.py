"""A `specdec serve` stack as a child process: start, wait until ready, stop, read state.

Used by the integration tests and by `bench.speedup --e2e`. The serve process runs in its own
session so a failed teardown can kill the whole process group (router, drafter pool,
verifiers); readiness and ports come from the state file `specdec serve --state-file` writes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from router.serve import free_port
from shared.paths import PROJECT_ROOT

START_TIMEOUT_S = 300.0


def metric_samples(text: str, name: str, **labels: str) -> list[float]:
    """Values of every sample called `name` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                out.append(sample.value)
    return out


class ServeProcess:
    """One `specdec serve` process and the state file it writes."""

    def __init__(self, workdir: Path, config: dict, grace_s: float = 20.0, ray: bool = False) -> None:
        self.workdir = workdir
        self.ray = ray  # `specdec serve --ray`: the Ray Serve application
        self.config_path = workdir / "specdec.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.state_path = workdir / "state.json"
        self.log_path = workdir / "serve.log"
        self.proc: subprocess.Popen | None = None
        self.grace_s = grace_s  # --grace-period of the serve process
        self.startup_s = 0.0

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.state_path.unlink(missing_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "router.cli", "serve", "--config", str(self.config_path),
                 "--port", "0", "--http-port", str(free_port() if self.ray else 0),  # Serve's proxy: no port 0
                 "--state-file", str(self.state_path), "--grace-period", str(self.grace_s)]
                + (["--ray"] if self.ray else []),
                cwd=PROJECT_ROOT, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        while True:
            if self.state_path.exists() and self.state.get("grpc_port"):
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"specdec serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() - t0 > START_TIMEOUT_S:
                self.kill()
                raise TimeoutError(f"specdec serve not ready after {START_TIMEOUT_S}s:\n{self.log_tail()}")
            time.sleep(0.2)
        self.startup_s = time.monotonic() - t0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> None:
        if not self.running:
            self.start()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; kills the process group if it does not exit in time."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------ addresses

    @property
    def state(self) -> dict:
        return json.loads(self.state_path.read_text())

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.state['grpc_port']}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.state['http_port']}"

    def child(self, name: str) -> dict:
        """A child's state: name is a target name or "pool" (the drafter)."""
        for child in self.state["children"]:
            if child["name"] == name:
                return child
        raise KeyError(name)

    def metrics(self, name: str | None = None) -> str:
        """/metrics text of a child (by name) or of the router (None)."""
        url = (
            f"{self.http_url}/metrics"
            if name is None
            else f"http://127.0.0.1:{self.child(name)['metrics_port']}/metrics"
        )
        return urllib.request.urlopen(url, timeout=10).read().decode()

    def active_sessions(self, name: str | None, service: str) -> float:
        return sum(metric_samples(self.metrics(name), "specdec:num_active_sessions", service=service))
