"""The Ray Serve application (`router.ray_app`) on a real, simulated three-node Ray cluster
(`ray.cluster_utils.Cluster`; fractional CPUs, small object stores, the proxy on the head
only): each target's verifier replicas land on the node that has its custom resource, the
drafter pool on its own; greedy output through Serve's HTTP proxy and the router's gRPC is
HF `generate`'s for every method; a killed verifier replica is replaced and requests
succeed again; a burst scales a target from one replica to two."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest

from router.serve import free_port
from tests.exactness import compare_greedy, humaneval_prompts, load_reference_model

ray = pytest.importorskip("ray")
# the burst test averages load over 2 s so that it scales quickly; Serve 2.60 warns at a
# window ≤ its deprecated metrics_interval_s default (10 s) even where the interval is set
pytestmark = pytest.mark.filterwarnings("ignore:`look_back_period_s`:FutureWarning")
serve = pytest.importorskip("ray.serve")

APP = "specdec"
M, S = "codelm-target-m", "codelm-target-s"
MAX_NEW = 32


@pytest.fixture(scope="module")
def app():
    from ray.cluster_utils import Cluster

    from router.ray_app import build_app
    from shared.config import AutoscalingConfig, default_config

    store = 80 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store,
                                                            "include_dashboard": False})  # fmt: skip
    node_m = cluster.add_node(num_cpus=2, resources={"weights-m": 1, "drafters": 1}, object_store_memory=store)
    node_s = cluster.add_node(num_cpus=2, resources={"weights-s": 1}, object_store_memory=store)
    ray.init(address=cluster.address, logging_level="WARNING")
    http_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port}, proxy_location="HeadOnly")
    base = default_config(router_port=0)
    ray_cfg = base.ray.model_copy(update={
        "router_num_cpus": 0.25, "drafter_num_cpus": 0.5, "verifier_num_cpus": 0.5,
        "target_resources": {M: {"weights-m": 0.1}, S: {"weights-s": 0.1}}, "drafter_resources": {"drafters": 0.1},
        "autoscaling": {S: AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=2,
                                             look_back_period_s=2, upscale_delay_s=1)},
        "autoscaling_metrics_interval_s": 0.5,
    })  # fmt: skip
    config = base.model_copy(update={"ray": ray_cfg})
    serve.run(build_app({"config_dict": config.model_dump(mode="json")}), name=APP, route_prefix="/")
    grpc_port = serve.get_deployment_handle("router", app_name=APP).grpc_port.remote().result()
    yield {"http": f"http://127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}",
           "nodes": {M: node_m.node_id, S: node_s.node_id, "drafters": node_m.node_id}}  # fmt: skip
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def _placement(deployment: str) -> dict[str, str]:
    """A replica's node and actor name (the deployments here run one replica each)."""
    return serve.get_deployment_handle(deployment, app_name=APP).placement.remote().result()


def _complete(base: str, prompt: list[int], method: str, max_tokens: int = MAX_NEW) -> list[int]:
    body = {"model": S if method == "_s" else M, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "method": method}  # fmt: skip
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["specdec"]["token_ids"]


@pytest.mark.slow
def test_replicas_land_on_the_nodes_with_their_resources(app):
    for deployment, node in ((f"verifier-{M}", app["nodes"][M]), (f"verifier-{S}", app["nodes"][S]),
                             ("drafter-pool", app["nodes"]["drafters"])):  # fmt: skip
        assert _placement(deployment)["node_id"] == node, deployment


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "ngram", "sorted", "card"])
def test_greedy_through_serve_http_and_grpc_equals_hf(app, method):
    from router.client import SpecdecClient

    _, tokenizer = load_reference_model(M)
    prompt = tokenizer(humaneval_prompts(1, offset=4)[0]).input_ids
    body = {"model": M, "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, "method": method}
    r = httpx.post(f"{app['http']}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert compare_greedy(M, prompt, r.json()["specdec"]["token_ids"], MAX_NEW).ok
    with SpecdecClient(app["grpc"]) as client:
        done = client.generate(S, prompt, max_new_tokens=MAX_NEW, method=method)
    assert compare_greedy(S, prompt, done.token_ids, MAX_NEW).ok


@pytest.mark.slow
def test_a_killed_verifier_replica_is_replaced(app):
    """Killed mid-stream: the in-flight stream ends with a clear in-band error (it already
    streamed tokens, so it cannot move); Serve replaces the replica, and a request sent
    right after the kill succeeds."""
    victim = _placement(f"verifier-{M}")["actor_name"]
    _, tokenizer = load_reference_model(M)
    prompt = tokenizer("def add(a, b):").input_ids
    body = {"model": M, "prompt": prompt, "max_tokens": 400, "temperature": 0, "method": "none", "stream": True}
    events = []
    with httpx.stream("POST", f"{app['http']}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[len("data: ") :])
            if len(events) == 1:  # streaming has started: kill the replica under it
                ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "went away" in error["message"] or "failed" in error["message"], error
    # at once: a request that has streamed nothing yet is retried on the deployment, which
    # holds it until Serve's replacement replica is up
    body = {"model": M, "prompt": prompt, "max_tokens": 16, "temperature": 0, "method": "ngram"}
    r = httpx.post(f"{app['http']}/v1/completions", json=body, timeout=180)
    assert r.status_code == 200, r.text
    assert compare_greedy(M, prompt, r.json()["specdec"]["token_ids"], 16).ok
    assert _placement(f"verifier-{M}")["actor_name"] != victim


@pytest.mark.slow
def test_a_burst_scales_a_target_to_two_replicas(app):
    """Serve decides on the load it sees (its status says so), the second replica starts,
    and both replicas then serve (asserted on Serve's status and on which replicas answer,
    not on timing)."""
    _, tokenizer = load_reference_model(S)
    prompts = [tokenizer(p).input_ids for p in humaneval_prompts(12)]
    body = lambda p: {"model": S, "prompt": p, "max_tokens": 128, "temperature": 0, "method": "none"}
    deployment = f"verifier-{S}"
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        # sustained load, not bursts: a burst of 12 batched requests can end inside Serve's
        # look-back window on a fast host, before the autoscaler has acted on it
        loaded = threading.Event()

        def keep_sending(prompt: list[int]) -> int:
            sent = 0
            while sent == 0 or not loaded.is_set():
                r = httpx.post(f"{app['http']}/v1/completions", json=body(prompt), timeout=300)
                assert r.status_code == 200, r.text
                sent += 1
            return sent

        senders = [pool.submit(keep_sending, p) for p in prompts]
        wanted, deadline = 1, time.monotonic() + 180
        while wanted < 2 and time.monotonic() < deadline and not any(f.done() for f in senders):
            wanted = max(wanted, sum(_states(deployment).values()))
            time.sleep(0.3)
        loaded.set()
        assert all(f.result() >= 1 for f in senders)
        assert wanted == 2, "Serve never asked for a second replica"
        deadline = time.monotonic() + 180
        while _states(deployment).get("RUNNING", 0) < 2:
            assert time.monotonic() < deadline, _states(deployment)
            time.sleep(1.0)
        futures = [pool.submit(httpx.post, f"{app['http']}/v1/completions", json=body(p), timeout=300) for p in prompts]
        assert all(f.result().status_code == 200 for f in futures)
    # both serve once idle: the request router ranks by load the replicas report every
    # few seconds, so the one that ran the burst gets requests once its report is fresh
    handle = serve.get_deployment_handle(deployment, app_name=APP)
    answered, deadline = set(), time.monotonic() + 30
    while len(answered) < 2 and time.monotonic() < deadline:
        answered.add(handle.placement.remote().result()["actor_name"])
        time.sleep(0.1)
    assert len(answered) == 2, answered


def _states(deployment: str) -> dict[str, int]:
    return dict(serve.status().applications[APP].deployments[deployment].replica_states)


@pytest.mark.slow
def test_a_killed_drafter_pool_costs_speculation_only_until_it_returns(app):
    """Requests stay exact with k = 0 while the pool is gone; Serve restarts it elsewhere (a
    new address) and the verifiers follow it, so drafting resumes."""
    _, tokenizer = load_reference_model(M)
    prompt = tokenizer(humaneval_prompts(1, offset=9)[0]).input_ids
    old = _placement("drafter-pool")["actor_name"]
    ray.kill(ray.get_actor(old, namespace="serve"), no_restart=True)
    body = {"model": M, "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, "method": "draft_model"}
    r = httpx.post(f"{app['http']}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert compare_greedy(M, prompt, r.json()["specdec"]["token_ids"], MAX_NEW).ok
    deadline = time.monotonic() + 180
    while True:  # until a request drafts again through the replacement pool
        r = httpx.post(f"{app['http']}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert compare_greedy(M, prompt, r.json()["specdec"]["token_ids"], MAX_NEW).ok
        if int(r.json()["specdec"]["stats"].get("num_accepted_tokens", 0)) > 0:
            break
        assert time.monotonic() < deadline, "the verifiers never drafted through the restarted pool"
        time.sleep(1.0)
    assert _placement("drafter-pool")["actor_name"] != old


@pytest.mark.slow
def test_verifier_deployments_place_by_the_routers_rule(app):
    """Every verifier deployment routes with `LeastLoadedRouter`, and its replicas report the
    load it ranks them by."""
    from ray.serve.context import _get_global_client

    from router.ray_routing import LeastLoadedRouter

    for target in (M, S):
        info = _get_global_client().get_deployment_info(f"verifier-{target}", APP)
        info = info[0] if isinstance(info, tuple) else info
        assert info.deployment_config.request_router_config.get_request_router_class() is LeastLoadedRouter
        stats = serve.get_deployment_handle(f"verifier-{target}", app_name=APP).record_routing_stats.remote().result()
        assert stats == {"in_flight": 0}


@pytest.mark.slow
def test_shutdown_drains_streams_in_flight(app):
    """Last in this module (it stops Serve): the shutdown `specdec serve --ray` runs on
    SIGTERM, while an HTTP and a gRPC stream are running, lets both finish, complete and
    exact."""
    from router.client import SpecdecClient
    from router.ray_app import drain_and_shutdown
    from tests.sse import streamed_token_ids

    _, tokenizer = load_reference_model(M)
    prompt = tokenizer(humaneval_prompts(1, offset=2)[0]).input_ids
    n = 96
    started = concurrent.futures.ThreadPoolExecutor(2)
    http_started, grpc_started = concurrent.futures.Future(), concurrent.futures.Future()

    def over_grpc() -> list[int]:
        with SpecdecClient(app["grpc"]) as client:
            for item in client.stream(S, prompt, max_new_tokens=n, method="none"):
                grpc_started.set_result(True) if not grpc_started.done() else None
        return item.token_ids

    body = {"model": M, "prompt": prompt, "max_tokens": n, "temperature": 0, "method": "none", "stream": True}
    http_tokens = started.submit(streamed_token_ids, f"{app['http']}/v1/completions", body, http_started)
    grpc_tokens = started.submit(over_grpc)
    assert http_started.result(120) and grpc_started.result(120)
    drain_and_shutdown(APP)
    assert compare_greedy(M, prompt, http_tokens.result(60), n).ok
    assert compare_greedy(S, prompt, grpc_tokens.result(60), n).ok
