"""The whole service through its public faces: `specdec serve` as real processes on loopback.

Greedy exactness through gRPC and HTTP for both targets and every offered method, bad input
(status codes and OpenAI's error shape), admission control, cancellation and deadlines that
free sessions on verifier and drafter, a drafter killed mid-generation, concurrency across
targets, the CLI, metrics, and SIGTERM draining (last: it stops the shared stack).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import httpx
import pytest

from shared.paths import PROJECT_ROOT
from shared.pb.specdec.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.exactness import compare_greedy, humaneval_prompts, load_reference_model
from tests.integration.conftest import MAX_SESSIONS_PER_REPLICA, metric_samples
from tests.sse import sse_events

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TARGETS = ("codelm-target-m", "codelm-target-s")
NUM_PROMPTS = 20
MAX_NEW_TOKENS = 64
LONG = 1000  # max_new_tokens of requests meant to still be running when the test acts


# ---------------------------------------------------------------- clients


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)  # concatenated chunks
    text: str = ""
    complete: dict | None = None  # token_ids, text, finish_reason, usage, stats
    first_token_at: float | None = None
    done_at: float | None = None


def _request(model: str, *, text: str | None = None, ids: list[int] | None = None, method: str = "",
             max_new_tokens: int = MAX_NEW_TOKENS, k: int | None = None,
             **sampling) -> router_pb2.GenerateRequest:  # fmt: skip
    req = router_pb2.GenerateRequest(
        model=model, method=method, max_new_tokens=max_new_tokens,
        sampling=common_pb2.SamplingParams(**sampling),
    )  # fmt: skip
    if ids is not None:
        req.token_ids.SetInParent()
        req.token_ids.token_ids.extend(ids)
    else:
        req.text = text if text is not None else "def f(x):"
    if k is not None:
        req.num_speculative_tokens = k
    return req


def _stub(address: str) -> router_pb2_grpc.GenerationServiceStub:
    return router_pb2_grpc.GenerationServiceStub(grpc.insecure_channel(address))


def grpc_generate(stub, request, timeout: float | None = 120.0, on_first=None) -> Generation:
    gen = Generation()
    for response in stub.Generate(request, timeout=timeout):
        kind = response.WhichOneof("response")
        if kind == "chunk":
            if gen.first_token_at is None and response.chunk.token_ids:
                gen.first_token_at = time.monotonic()
                if on_first is not None:
                    on_first()
            gen.token_ids.extend(response.chunk.token_ids)
            gen.text += response.chunk.text
        elif kind == "complete":
            c = response.complete
            gen.complete = {
                "token_ids": list(c.token_ids), "text": c.text,
                "finish_reason": common_pb2.FinishReason.Name(c.finish_reason),
                "prompt_tokens": c.usage.prompt_tokens,
                "completion_tokens": c.usage.completion_tokens,
                "num_draft_tokens": c.stats.num_draft_tokens,
                "num_spec_rounds": c.stats.num_spec_rounds,
            }  # fmt: skip
        else:
            raise AssertionError(f"in-band error: {response.error}")
    gen.done_at = time.monotonic()
    return gen


def http_generate(client: httpx.Client, body: dict) -> Generation:
    gen = Generation()
    if not body.get("stream"):
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
        choice = out["choices"][0]
        gen.token_ids = out["specdec"]["token_ids"]
        gen.text = choice["text"]
        gen.complete = {
            "finish_reason": choice["finish_reason"], "usage": out["usage"],
            "stats": out["specdec"]["stats"],
        }  # fmt: skip
        gen.done_at = time.monotonic()
        return gen
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for event in sse_events(r):
            assert "error" not in event, event
            choice = event["choices"][0]
            gen.text += choice["text"]
            gen.token_ids.extend(event["specdec"]["token_ids"])
            if gen.first_token_at is None and event["specdec"]["token_ids"]:
                gen.first_token_at = time.monotonic()
            if choice["finish_reason"] is not None:
                gen.complete = {"finish_reason": choice["finish_reason"],
                                "usage": event.get("usage"), "stats": event["specdec"]["stats"]}  # fmt: skip
    gen.done_at = time.monotonic()
    return gen


def _tokenize(model: str, text: str) -> list[int]:
    return load_reference_model(model)[1](text).input_ids


def _wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _offered_methods(stack) -> dict[str, list[str]]:
    resp = _stub(stack.grpc_address).ListModels(router_pb2.ListModelsRequest(), timeout=10)
    return {m.name: list(m.methods) for m in resp.models}


def _assert_exact(model: str, ids: list[int], got: list[int], label: str, ties: list[str]) -> None:
    cmp = compare_greedy(model, ids, got, MAX_NEW_TOKENS)
    assert cmp.ok, (
        f"{label}: diverged from HF greedy at {cmp.position} "
        f"(top-2 gap {cmp.top2_gap} >= {cmp.threshold})"
    )
    if cmp.tie:
        ties.append(f"{label} @ {cmp.position} (gap {cmp.top2_gap:.2e})")


# ---------------------------------------------------------------- models, health


def test_list_models_health_and_reflection(stack):
    methods = _offered_methods(stack)
    assert set(methods) == set(TARGETS)
    expected = {"none", "ngram", "draft_model"}
    if (PROJECT_ROOT / "models" / "codelm-sorted" / "sorted.json").is_file():
        expected.add("sorted")  # the committed demo S2D drafter serves both targets
    for name in TARGETS:
        assert expected <= set(methods[name]), methods[name]

    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    channel = grpc.insecure_channel(stack.grpc_address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "specdec.v1.GenerationService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert "specdec.v1.GenerationService" in set(ProtoReflectionDescriptorDatabase(channel).get_services())

    with httpx.Client(base_url=stack.http_url, timeout=10) as client:
        models = client.get("/v1/models").json()
        assert models["object"] == "list"
        assert {m["id"] for m in models["data"]} == set(TARGETS)
        assert all(m["specdec"]["num_replicas"] == 1 for m in models["data"])
        assert client.get("/health").status_code == 200


# ---------------------------------------------------------------- greedy exactness


@pytest.mark.parametrize("method", ["none", "ngram", "draft_model", "sorted", "card"])
@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_greedy_exact_for_both_targets(stack, transport, method, record_property):
    offered = _offered_methods(stack)
    if any(method not in offered[t] for t in TARGETS):
        pytest.skip(f"the drafter pool does not offer {method!r}")
    prompts = humaneval_prompts(NUM_PROMPTS)

    def run_target(model: str) -> tuple[list[str], int]:
        ties: list[str] = []
        num_draft_tokens = 0
        stub = _stub(stack.grpc_address)
        with httpx.Client(base_url=stack.http_url, timeout=120) as client:
            for i, prompt in enumerate(prompts):
                ids = _tokenize(model, prompt)
                label = f"{transport}/{model}/{method}/prompt {i}"
                if transport == "grpc":
                    gen = grpc_generate(stub, _request(model, text=prompt, method=method))
                    c = gen.complete
                    assert c is not None, label
                    assert c["token_ids"] == gen.token_ids and c["text"] == gen.text, label
                    assert c["prompt_tokens"] == len(ids), label
                    num_draft_tokens += c["num_draft_tokens"]
                else:
                    # Even prompts: text, not streamed; odd: token ids, streamed (SSE).
                    body = {"model": model, "max_tokens": MAX_NEW_TOKENS, "temperature": 0,
                            "method": method, "stream": bool(i % 2),
                            "prompt": ids if i % 2 else prompt}  # fmt: skip
                    gen = http_generate(client, body)
                    assert gen.complete is not None, label
                    num_draft_tokens += gen.complete["stats"]["num_draft_tokens"]
                    if gen.complete["usage"]:
                        assert gen.complete["usage"]["prompt_tokens"] == len(ids), label
                _assert_exact(model, ids, gen.token_ids, label, ties)
        return ties, num_draft_tokens

    for model in TARGETS:
        load_reference_model(model)  # NOTE: transformers' lazy imports race across threads
    # Both targets at once: their verifiers are separate processes (2 cores).
    with ThreadPoolExecutor(len(TARGETS)) as pool:
        results = dict(zip(TARGETS, pool.map(run_target, TARGETS)))
    ties = [t for r in results.values() for t in r[0]]
    record_property("ties", ties)
    if ties:
        print(f"floating-point ties: {ties}")
    if method in ("draft_model", "sorted", "card"):
        for model, (_, num_draft_tokens) in results.items():
            assert num_draft_tokens > 0, f"{model}/{method}: no draft tokens were verified"


# ---------------------------------------------------------------- bad input

# (request kwargs, gRPC status, HTTP body, HTTP status, field / param)
_BAD_INPUT = [
    ("unknown model", dict(model="nope"), grpc.StatusCode.NOT_FOUND,
     {"model": "nope", "prompt": "x"}, 404, "model"),
    ("empty prompt", dict(text=""), grpc.StatusCode.INVALID_ARGUMENT,
     {"prompt": ""}, 400, "prompt"),
    ("empty token ids", dict(ids=[]), grpc.StatusCode.INVALID_ARGUMENT,
     {"prompt": []}, 400, "prompt"),
    ("prompt beyond context", dict(ids=[5] * 2048), grpc.StatusCode.INVALID_ARGUMENT,
     {"prompt": [5] * 2048}, 400, "prompt"),
    ("prompt + new tokens beyond context", dict(ids=[5] * 2000, max_new_tokens=100),
     grpc.StatusCode.INVALID_ARGUMENT, {"prompt": [5] * 2000, "max_tokens": 100}, 400, "max_new_tokens"),
    ("max new tokens 0", dict(max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT,
     {"max_tokens": 0}, 400, "max_new_tokens"),
    ("max new tokens above limit", dict(max_new_tokens=1025), grpc.StatusCode.INVALID_ARGUMENT,
     {"max_tokens": 1025}, 400, "max_new_tokens"),
    ("temperature < 0", dict(temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT,
     {"temperature": -0.5}, 400, "temperature"),
    ("top_p > 1", dict(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT,
     {"top_p": 1.5}, 400, "top_p"),
    ("top_p < 0", dict(top_p=-0.1), grpc.StatusCode.INVALID_ARGUMENT,
     {"top_p": 0}, 400, "top_p"),
    ("top_k < 0", dict(top_k=-3), grpc.StatusCode.INVALID_ARGUMENT,
     {"top_k": -3}, 400, "top_k"),
    ("unknown method", dict(method="beam"), grpc.StatusCode.INVALID_ARGUMENT,
     {"method": "beam"}, 400, "method"),
    ("negative token id", dict(ids=[1, -1]), grpc.StatusCode.INVALID_ARGUMENT,
     {"prompt": [1, -1]}, 400, "prompt"),
    ("token id >= vocab", dict(ids=[1, 4096]), grpc.StatusCode.INVALID_ARGUMENT,
     {"prompt": [1, 4096]}, 400, "prompt"),
]  # fmt: skip
_HTTP_PARAM = {"max_new_tokens": "max_tokens"}


@pytest.mark.parametrize("case", _BAD_INPUT, ids=[c[0] for c in _BAD_INPUT])
def test_bad_input_grpc_status(stack, case):
    _, kwargs, code, _, _, fld = case
    kwargs = dict(kwargs)
    model = kwargs.pop("model", TARGETS[1])
    with pytest.raises(grpc.RpcError) as info:
        grpc_generate(_stub(stack.grpc_address), _request(model, **kwargs), timeout=30)
    err = info.value
    assert err.code() == code, err.details()
    metadata = dict(err.trailing_metadata() or ())
    assert metadata.get("specdec-field") == fld or fld in err.details(), (fld, err.details())


@pytest.mark.parametrize("case", _BAD_INPUT, ids=[c[0] for c in _BAD_INPUT])
def test_bad_input_http_openai_error(stack, case):
    _, _, _, body, status, fld = case
    body = {"model": TARGETS[1], "prompt": "def f(x):", "max_tokens": 8, "temperature": 0, **body}
    with httpx.Client(base_url=stack.http_url, timeout=30) as client:
        for stream in (False, True):
            r = client.post("/v1/completions", json={**body, "stream": stream})
            assert r.status_code == status, r.text
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["param"] == _HTTP_PARAM.get(fld, fld) and err["message"]
            assert err["type"] == "invalid_request_error"


def test_http_malformed_body_is_400(stack):
    with httpx.Client(base_url=stack.http_url, timeout=30) as client:
        for body, param in [
            ({"model": TARGETS[0], "prompt": "x", "max_tokens": "many"}, "max_tokens"),
            ({"prompt": "x"}, "model"),
            ({"model": TARGETS[0], "prompt": ["a", "b"]}, "prompt"),  # batched prompts
            ({"model": TARGETS[0], "prompt": "x", "n": 2}, "n"),
        ]:
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param


# ---------------------------------------------------------------- capacity, cancel, deadline


def _sessions(stack, model: str) -> tuple[float, float, float]:
    """Active sessions: (router for `model`, verifier of `model`, whole drafter pool)."""
    router = sum(metric_samples(stack.metrics(), "specdec:num_active_sessions",
                                service="router", model=model))  # fmt: skip
    return router, stack.active_sessions(model, "verifier"), stack.active_sessions("pool", "drafter")


def test_over_capacity_then_cancel_frees_sessions(stack):
    model = TARGETS[0]
    stub = _stub(stack.grpc_address)
    assert _wait_until(lambda: _sessions(stack, model) == (0, 0, 0), 15), _sessions(stack, model)
    # Fill the replica (limit 2) with long draft_model streams; wait for their first tokens.
    streams = []
    for _ in range(MAX_SESSIONS_PER_REPLICA):
        call = stub.Generate(_request(model, method="draft_model", max_new_tokens=LONG, k=3), timeout=120)
        assert next(call).WhichOneof("response") == "chunk"
        streams.append(call)
    assert _wait_until(lambda: _sessions(stack, model) == (2, 2, 2), 10), _sessions(stack, model)

    with pytest.raises(grpc.RpcError) as info:
        grpc_generate(stub, _request(model, max_new_tokens=8), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with httpx.Client(base_url=stack.http_url, timeout=30) as client:
        r = client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 8})
        assert r.status_code == 429
        assert r.json()["error"]["type"] == "rate_limit_error"
        # The other target has its own replica and capacity.
        ok = client.post("/v1/completions", json={"model": TARGETS[1], "prompt": "x", "max_tokens": 4})
        assert ok.status_code == 200, ok.text

    # Client cancels: the router cancels upstream; verifier and drafter free the sessions.
    for call in streams:
        call.cancel()
    assert _wait_until(lambda: _sessions(stack, model) == (0, 0, 0), 20), _sessions(stack, model)

    # HTTP: a streaming client that disconnects frees its sessions as well.
    with httpx.Client(base_url=stack.http_url, timeout=60) as client:
        body = {"model": model, "prompt": "def f(x):", "max_tokens": LONG, "temperature": 0,
                "method": "draft_model", "num_speculative_tokens": 3, "stream": True}  # fmt: skip
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = sse_events(r)  # NOTE: keep it: a collected generator closes the stream
            next(events)
            assert _wait_until(lambda: _sessions(stack, model) == (1, 1, 1), 10), _sessions(stack, model)
    assert _wait_until(lambda: _sessions(stack, model) == (0, 0, 0), 20), _sessions(stack, model)
    # A freed replica admits again.
    gen = grpc_generate(stub, _request(model, max_new_tokens=4))
    assert len(gen.token_ids) == 4


def test_http_clients_closing_at_done_keep_no_slot(stack):
    # Clients that hang up right after `data: [DONE]` (before the body's end) must not leave
    # admission slots behind: more requests than the replica limit, one after another.
    model = TARGETS[1]
    body = {"model": model, "prompt": "def f(x):", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.Client(base_url=stack.http_url, timeout=30) as client:
        for _ in range(MAX_SESSIONS_PER_REPLICA + 2):
            with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200, r.read()
                assert sum(len(e["specdec"]["token_ids"]) for e in sse_events(r)) == 4
    assert _wait_until(lambda: _sessions(stack, model)[0] == 0, 10)


def test_deadline_is_propagated_upstream(stack):
    model = TARGETS[1]
    stub = _stub(stack.grpc_address)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        grpc_generate(stub, _request(model, method="draft_model", max_new_tokens=LONG), timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 5
    # The verifier got the deadline too: its session ends without a client cancel.
    assert _wait_until(lambda: _sessions(stack, model) == (0, 0, 0), 20), _sessions(stack, model)


# ---------------------------------------------------------------- concurrency


def test_concurrent_requests_to_both_targets(stack):
    prompts = humaneval_prompts(4, offset=20)
    jobs = [(TARGETS[i % 2], prompts[i]) for i in range(4)]  # 2 per target = the replica limit
    barrier = threading.Barrier(len(jobs))
    for model in TARGETS:
        load_reference_model(model)

    def run(job):
        model, prompt = job
        stub = _stub(stack.grpc_address)
        barrier.wait()
        return grpc_generate(stub, _request(model, text=prompt, method="ngram", max_new_tokens=96))

    with ThreadPoolExecutor(len(jobs)) as pool:
        gens = list(pool.map(run, jobs))

    def peak(intervals):
        events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
        level = best = 0
        for _, delta in events:
            level += delta
            best = max(best, level)
        return best

    intervals = [(g.first_token_at, g.done_at) for g in gens]
    assert peak(intervals) > 1, intervals
    for model in TARGETS:
        # Two requests of one target stream at the same time: no per-target global lock.
        assert peak([iv for (m, _), iv in zip(jobs, intervals) if m == model]) > 1, model
    for (model, prompt), gen in zip(jobs, gens):
        ids = _tokenize(model, prompt)
        cmp = compare_greedy(model, ids, gen.token_ids, 96)
        assert cmp.ok, f"{model}: diverged at {cmp.position}"


def test_concurrent_sorted_requests_of_both_targets_share_one_drafter(stack):
    """Both targets' sessions on the one sorted drafter at once: all exact, the pool batched
    drafter forwards of sessions ready together (its /metrics), and each verifier exported
    its draft tokens per exit."""
    if any("sorted" not in m for m in _offered_methods(stack).values()):
        pytest.skip("the drafter pool does not offer 'sorted'")
    prompts = humaneval_prompts(2 * MAX_SESSIONS_PER_REPLICA, offset=30)
    jobs = [(TARGETS[i % 2], prompts[i]) for i in range(len(prompts))]  # the replica limit
    for model in TARGETS:
        load_reference_model(model)

    def batches_over_one() -> float:
        text = stack.metrics("pool")
        count = sum(metric_samples(text, "specdec:drafter_batch_size_count", drafter="codelm-sorted"))
        ones = sum(metric_samples(text, "specdec:drafter_batch_size_bucket",
                                  drafter="codelm-sorted", le="1.0"))  # fmt: skip
        return count - ones

    before = batches_over_one()
    barrier = threading.Barrier(len(jobs))

    def run(job):
        model, prompt = job
        stub = _stub(stack.grpc_address)
        barrier.wait()
        return grpc_generate(stub, _request(model, text=prompt, method="sorted", max_new_tokens=96))

    # NOTE: rounds of 4 sessions over 2 verifier processes meet at the drafter by chance;
    # over ~100 rounds each, some Commits arrive while a batch runs (a few tries at most).
    for attempt in range(3):
        with ThreadPoolExecutor(len(jobs)) as pool:
            gens = list(pool.map(run, jobs))
        for (model, prompt), gen in zip(jobs, gens):
            cmp = compare_greedy(model, _tokenize(model, prompt), gen.token_ids, 96)
            assert cmp.ok, f"{model}: diverged at {cmp.position}"
            assert gen.complete["num_draft_tokens"] > 0, model
        if batches_over_one() > before:
            break
    assert batches_over_one() > before, "no drafter batch of more than one session"
    for model in TARGETS:
        verifier = stack.metrics(model)
        assert sum(metric_samples(verifier, "specdec:num_draft_tokens_per_exit_total", model=model)) > 0


# ---------------------------------------------------------------- drafter faults


def test_drafter_killed_mid_generation_then_speculation_resumes(stack):
    model = TARGETS[0]
    stub = _stub(stack.grpc_address)
    prompt = humaneval_prompts(1, offset=2)[0]
    ids = _tokenize(model, prompt)
    drafter = stack.child("pool")
    killed = threading.Event()

    def kill_drafter():
        os.kill(drafter["pid"], signal.SIGKILL)
        killed.set()

    max_new = 160
    gen = grpc_generate(
        stub, _request(model, text=prompt, method="draft_model", max_new_tokens=max_new, k=3),
        on_first=kill_drafter,
    )  # fmt: skip
    assert killed.is_set()
    assert gen.complete is not None and len(gen.token_ids) == max_new
    cmp = compare_greedy(model, ids, gen.token_ids, max_new)
    assert cmp.ok, f"diverged at {cmp.position} after the drafter was killed"

    # `specdec serve` restarts the pool on the same port; the verifier reconnects.
    assert _wait_until(lambda: stack.child("pool")["restarts"] >= 1, 120), stack.log_tail()
    assert stack.child("pool")["pid"] != drafter["pid"]

    def speculates() -> bool:
        g = grpc_generate(stub, _request(model, text=prompt, method="draft_model", max_new_tokens=16, k=3))
        return g.complete["num_draft_tokens"] > 0

    assert _wait_until(speculates, 60, interval=1.0), "speculation did not resume:\n" + stack.log_tail()


# ---------------------------------------------------------------- CLI and metrics


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "router.cli", *args], cwd=PROJECT_ROOT, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


def test_cli_generate_json_and_plain(stack):
    prompt = humaneval_prompts(1)[0]
    model = TARGETS[1]
    out = _cli("generate", "--model", model, "--prompt", prompt, "--method", "ngram",
               "--max-new-tokens", "24", "--server", stack.grpc_address, "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert {"token_ids", "text", "stats"} <= set(result)
    assert len(result["token_ids"]) == 24 and result["finish_reason"] == "length"
    ids = _tokenize(model, prompt)
    assert compare_greedy(model, ids, result["token_ids"], 24).ok

    plain = _cli("generate", "--model", model, "--prompt", prompt, "--max-new-tokens", "24",
                 "--server", stack.grpc_address)  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == result["text"] + "\n"

    bad = _cli("generate", "--model", "nope", "--prompt", "x", "--server", stack.grpc_address)
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr


def test_metrics_on_every_service(stack):
    model = TARGETS[0]
    grpc_generate(_stub(stack.grpc_address), _request(model, method="draft_model", max_new_tokens=24, k=3))
    router = stack.metrics()
    assert metric_samples(router, "specdec:time_to_first_token_seconds_count", service="router", model=model)[0] > 0
    assert metric_samples(router, "specdec:inter_token_latency_seconds_count", service="router", model=model)[0] > 0
    verifier = stack.metrics(model)
    labels = {"model": model, "method": "draft_model"}
    assert metric_samples(verifier, "specdec:num_drafts_total", **labels)[0] > 0
    assert metric_samples(verifier, "specdec:num_draft_tokens_total", **labels)[0] > 0
    assert metric_samples(verifier, "specdec:num_accepted_tokens_total", **labels)
    assert metric_samples(verifier, "specdec:time_to_first_token_seconds_count", service="verifier", model=model)
    drafter = stack.metrics("pool")
    assert metric_samples(drafter, "specdec:num_active_sessions", service="drafter")


def test_router_alone_against_running_verifier(stack):
    # `python -m router` with one --verifier: the stack's codelm-target-s replica.
    model = TARGETS[1]
    verifier = stack.child(model)["address"]
    state = stack.workdir / "router-alone.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", "--config", str(stack.config_path), "--port", "0",
         "--http-port", "0", "--verifier", f"{model}={verifier}", "--state-file", str(state)],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("LISTENING "), proc.stderr.read() if proc.poll() is not None else line
        address = f"127.0.0.1:{int(line.split()[1])}"
        gen = grpc_generate(_stub(address), _request(model, method="ngram", max_new_tokens=8))
        assert len(gen.token_ids) == 8
        # The other target is configured but has no replica here.
        with pytest.raises(grpc.RpcError) as info:
            grpc_generate(_stub(address), _request(TARGETS[0], max_new_tokens=8), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        http_port = json.loads(state.read_text())["http_port"]
        r = httpx.get(f"http://127.0.0.1:{http_port}/v1/models", timeout=10)
        replicas = {m["id"]: m["specdec"]["num_replicas"] for m in r.json()["data"]}
        assert replicas == {model: 1, TARGETS[0]: 0}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- shutdown (last)


def test_sigterm_drains_in_flight_and_exits_zero(stack):
    model = TARGETS[1]
    stub = _stub(stack.grpc_address)
    children = [c["pid"] for c in stack.state["children"]]
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            grpc_generate, stub, _request(model, method="ngram", max_new_tokens=300), 120, started.set
        )
        assert started.wait(60)
        stack.proc.send_signal(signal.SIGTERM)
        gen = future.result(timeout=120)
    # The in-flight request finished normally during the drain.
    assert gen.complete is not None and len(gen.token_ids) == 300
    assert gen.complete["finish_reason"] == "FINISH_REASON_LENGTH"
    assert stack.proc.wait(60) == 0, stack.log_tail()
    for pid in children:
        assert not _alive(pid), f"child {pid} survived the router"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of an exited child counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
