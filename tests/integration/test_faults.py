"""Faults survived by a real `specdec serve` (subprocesses on loopback): a verifier replica
SIGKILLed (failover, clear UNAVAILABLE mid-stream, restart), a drafter frozen by SIGSTOP
(exact output, speculation off, back after SIGCONT), the router SIGKILLed (no orphans).

One target (codelm-target-s) with two verifier replicas and the codelm-draft pool keeps the
stack small; the router-kill test runs last because it ends the stack.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest

from router.stack import ServeProcess, metric_samples
from shared.config import default_config
from shared.pb.specdec.v1 import router_pb2
from tests.exactness import compare_greedy, humaneval_prompts
from tests.integration.test_service import _request, _stub, _tokenize, _wait_until, grpc_generate

pytestmark = pytest.mark.slow

MODEL = "codelm-target-s"
GRACE_S = 3.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = default_config()
    config = base.model_dump(mode="json")
    config["targets"] = [dict(t, replicas=2) for t in config["targets"] if t["name"] == MODEL]
    config["drafters"] = [d for d in config["drafters"] if d["kind"] == "draft_model"]
    config.update(router_port=0, http_port=0)
    # NOTE: a frozen drafter costs at most this per round; short keeps the test fast
    config["speculation"]["draft_timeout_s"] = 0.05
    stack = ServeProcess(tmp_path_factory.mktemp("faults"), config, grace_s=GRACE_S)
    stack.start()
    yield stack
    if stack.running:
        stack.kill()


def verifiers(stack) -> list[dict]:
    return [c for c in stack.state["children"] if c["role"] == "verifier"]


def active(child: dict) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{child['metrics_port']}/metrics", timeout=10).read().decode()
    return sum(metric_samples(text, "specdec:num_active_sessions", service="verifier"))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by a dead parent's init) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_verifier_killed_mid_stream_ends_clearly_and_others_fail_over(stack):
    stub = _stub(stack.grpc_address)
    prompt = humaneval_prompts(1, offset=5)[0]
    victim: dict = {}

    def kill_serving_replica():
        for child in verifiers(stack):
            if active(child) > 0:
                victim.update(child)
                os.kill(child["pid"], signal.SIGKILL)
                return

    with pytest.raises((AssertionError, grpc.RpcError)) as ended:
        grpc_generate(stub, _request(MODEL, text=prompt, method="none", max_new_tokens=200),
                      on_first=kill_serving_replica)  # fmt: skip
    assert victim, "no replica reported the running session"
    assert "UNAVAILABLE" in str(ended.value) or "unavailable" in str(ended.value).lower()
    assert "127.0.0.1" not in str(ended.value)  # no internal address in the client's error

    # Requests that start now go to the surviving replica (or the restarted one): all exact.
    ids = _tokenize(MODEL, prompt)
    for _ in range(4):
        gen = grpc_generate(stub, _request(MODEL, ids=ids, method="draft_model", max_new_tokens=24, k=3))
        assert compare_greedy(MODEL, ids, gen.token_ids, 24).ok

    def restarted() -> bool:
        return any(c["pid"] != victim["pid"] and c["port"] == victim["port"] and c["restarts"] >= 1
                   for c in verifiers(stack))  # fmt: skip

    assert _wait_until(restarted, 180), stack.log_tail()
    # both replicas serve again: concurrent requests succeed
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        grpc_generate(_stub(stack.grpc_address), _request(MODEL, ids=ids, method="ngram", max_new_tokens=16))))
        for _ in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 3 and all(compare_greedy(MODEL, ids, g.token_ids, 16).ok for g in results)


def test_frozen_drafter_costs_speculation_not_output(stack):
    stub = _stub(stack.grpc_address)
    prompt = humaneval_prompts(1, offset=7)[0]
    ids = _tokenize(MODEL, prompt)
    pool = stack.child("pool")
    os.kill(pool["pid"], signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        gen = grpc_generate(stub, _request(MODEL, ids=ids, method="draft_model", max_new_tokens=48, k=3), timeout=120)
        elapsed = time.monotonic() - t0
        assert compare_greedy(MODEL, ids, gen.token_ids, 48).ok
        assert gen.complete["num_draft_tokens"] == 0  # nothing came back from the frozen pool
        assert elapsed < 60, elapsed  # bounded by the draft budget, never stuck
    finally:
        os.kill(pool["pid"], signal.SIGCONT)

    def speculates() -> bool:
        g = grpc_generate(stub, _request(MODEL, ids=ids, method="draft_model", max_new_tokens=16, k=3))
        return g.complete["num_draft_tokens"] > 0

    assert _wait_until(speculates, 60, interval=1.0), "speculation did not resume after SIGCONT"


def test_a_drain_that_outlives_its_grace_period_ends_on_time(stack):
    """SIGTERM while a request runs far longer than the grace period: the request ends (in
    band or with a status) soon after the grace period, the stack exits 0, no child is
    left; then the stack starts again for the next test."""
    children = [c["pid"] for c in stack.state["children"]]
    ended = threading.Event()
    outcome: dict = {}

    def long_request():
        try:
            gen = grpc_generate(_stub(stack.grpc_address), _request(MODEL, method="none", max_new_tokens=1000),
                                timeout=120, on_first=lambda: outcome.setdefault("first", time.monotonic()))
            outcome["result"] = gen.complete
        except BaseException as e:  # noqa: BLE001 - any clean end is fine; we time it
            outcome["error"] = repr(e)
        ended.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    assert _wait_until(lambda: "first" in outcome, 60)
    t0 = time.monotonic()
    stack.proc.send_signal(signal.SIGTERM)
    assert ended.wait(GRACE_S + 30), "the request outlived the drain"
    assert stack.proc.wait(GRACE_S + 60) == 0, stack.log_tail()
    assert time.monotonic() - t0 < GRACE_S + 60
    assert _wait_until(lambda: not any(alive(pid) for pid in children), 30)
    stack.ensure_running()


def test_router_sigkill_leaves_no_orphans(stack):
    children = [c["pid"] for c in stack.state["children"]]
    assert all(alive(pid) for pid in children)
    stack.proc.send_signal(signal.SIGKILL)  # the router only, not its process group
    stack.proc.wait(10)
    assert _wait_until(lambda: not any(alive(pid) for pid in children), 60), [p for p in children if alive(p)]
    with pytest.raises(grpc.RpcError):
        _stub(stack.grpc_address).ListModels(router_pb2.ListModelsRequest(), timeout=2)
