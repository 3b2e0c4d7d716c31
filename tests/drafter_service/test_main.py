"""`python -m drafter_service` as a process: port announcement, health, SIGTERM."""

from __future__ import annotations

import signal

import pytest

from tests.grpc_servers import health_status, spawn_service, wait_serving

pytestmark = pytest.mark.slow


def test_announces_port_reports_health_and_stops_on_sigterm():
    proc, port = spawn_service("drafter_service", "--grace", "2")
    try:
        address = f"127.0.0.1:{port}"
        seen = wait_serving(address)
        assert seen[-1] == 1  # SERVING (NOT_SERVING before it, unless loading beat the first poll)
        assert health_status(address, "specdec.v1.DrafterService") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
