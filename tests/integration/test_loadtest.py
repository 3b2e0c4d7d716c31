"""`python -m bench.loadtest` against the real processes: a running `specdec serve` (one target,
its default batch rows and queue) over HTTP and gRPC, and a stack the tool starts itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import loadtest
from tests.integration.conftest import ONE_TARGET

pytestmark = pytest.mark.slow

TARGET = ONE_TARGET


def report(base):
    return json.loads(base.with_suffix(".json").read_text())["rows"], base.with_suffix(".md").read_text()


def test_sweep_over_http_and_grpc_completes_every_request(one_target_stack, tmp_path):
    stack = one_target_stack
    verifier_metrics = f"http://127.0.0.1:{stack.child(TARGET)['metrics_port']}/metrics"
    base = loadtest.main([
        "--http-url", stack.http_url, "--grpc-address", stack.grpc_address, "--protocols", "http", "grpc",
        "--metrics-url", verifier_metrics, "--targets", TARGET, "--methods", "ngram",
        "--concurrency", "1", "4", "--requests-per-level", "8", "--max-tokens", "16", "--out-dir", str(tmp_path),
    ])  # fmt: skip
    rows, markdown = report(base)
    assert [(r["protocol"], r["level"]) for r in rows] == [("http", 1), ("http", 4), ("grpc", 1), ("grpc", 4)]
    for row in rows:
        assert (row["requests"], row["completed"], row["rejected"], row["failed"]) == (8, 8, 0, 0), row
        assert row["requests_per_s"] > 0 and row["output_tokens_per_s"] > 0
        assert 0 < row["ttft_s"]["p50"] <= row["e2e_s"]["p50"]
        assert row["token_sources"] == ["usage"]
        assert row["tau"] >= 1.0  # specdec's stats reach the report over both protocols
        assert 0 <= row["drafted_share"] <= 1
        assert row["mean_batch_rows"] >= 1.0
    # a fresh replica tries drafting first (the load arms may then run the rest plain): the
    # drafted share reaches the report
    assert rows[0]["drafted_share"] > 0, rows[0]
    assert markdown.count(f"| {TARGET} | ngram |") == 4
    assert base.with_suffix(".png").stat().st_size > 0


def test_without_a_url_it_serves_the_targets_itself_and_stops_them(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("limits:\n  max_stop_strings: 2\n")  # merged over the default config
    base = loadtest.main([
        "--config", str(override), "--targets", TARGET, "--methods", "none", "--concurrency", "2",
        "--requests-per-level", "4", "--max-tokens", "8", "--dataset", "mt_bench", "--out-dir", str(tmp_path),
    ])  # fmt: skip
    (row,) = report(base)[0]
    assert (row["protocol"], row["completed"], row["failed"]) == ("http", 4, 0), row
    assert row["mean_batch_rows"] >= 1.0  # the verifier's own /metrics was scraped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_sigterm_stops_the_server_the_tool_started(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the tool's `specdec serve` works under tmp_path
    tool = subprocess.Popen([
        sys.executable, "-m", "bench.loadtest", "--targets", TARGET, "--methods", "none", "--concurrency", "1",
        "--requests-per-level", "100000", "--max-tokens", "8", "--out-dir", str(tmp_path / "out"),
    ], cwd=Path(__file__).parents[2], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not pids and time.monotonic() < deadline:
            for state_file in tmp_path.glob("loadtest-*/state.json"):
                state = json.loads(state_file.read_text() or "{}")
                pids = [state["pid"], *(c["pid"] for c in state.get("children", []) if c.get("pid"))]
                pids = pids if len(pids) > 1 else []
            time.sleep(0.5)
        assert pids, "the tool's specdec serve never came up"
        time.sleep(2)  # requests are flowing
        tool.send_signal(signal.SIGTERM)
        assert tool.wait(timeout=120) != 0
        assert not [pid for pid in pids if _alive(pid)], "the server outlived the tool"
    finally:
        tool.kill()
        for pid in pids:  # a failed run must not leave the server behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
