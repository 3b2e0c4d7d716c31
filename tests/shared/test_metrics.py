"""shared/metrics.py: vLLM-style names, per-request spec-decode counters, latency helpers."""

from __future__ import annotations

import urllib.request

from shared import metrics
from shared.types import SpecStats


def _value(name: str, **labels: str) -> float:
    return metrics.sample_value(name, labels) or 0.0


def test_observe_request_counts_drafts_tokens_and_positions():
    # 3 speculative rounds (+1 k = 0 round): 12 drafted, 5 accepted, τ = 1 + 5/3.
    stats = SpecStats(
        num_rounds=4, num_spec_rounds=3, num_draft_tokens=12, num_accepted_tokens=5,
        num_accepted_per_pos=[3, 2, 0, 0],
    )  # fmt: skip
    labels = {"model": "test-metrics-m", "method": "draft_model"}
    metrics.observe_request("test-metrics-m", "draft_model", stats)
    assert _value("specdec:num_drafts_total", **labels) == 3
    assert _value("specdec:num_draft_tokens_total", **labels) == 12
    assert _value("specdec:num_accepted_tokens_total", **labels) == 5
    assert _value("specdec:num_rounds_total", **labels) == 4
    assert _value("specdec:num_accepted_tokens_per_pos_total", **labels, position="0") == 3
    assert _value("specdec:num_accepted_tokens_per_pos_total", **labels, position="1") == 2
    # τ from the counters equals the per-request τ.
    tau = 1 + _value("specdec:num_accepted_tokens_total", **labels) / _value(
        "specdec:num_drafts_total", **labels
    )
    assert tau == stats.mean_acceptance_length


def test_sorted_requests_count_per_exit():
    # exits 1 and 3 drafted; only sorted requests feed the per-exit series
    stats = SpecStats(num_rounds=2, num_spec_rounds=2, num_draft_tokens=5, num_accepted_tokens=2)
    stats.observe_exits([1, 1, 3], 2)
    stats.observe_exits([3, 1], 0)
    assert stats.num_draft_tokens_per_exit == {1: 3, 3: 2}
    assert stats.num_accepted_tokens_per_exit == {1: 2}
    metrics.observe_request("test-metrics-s", "sorted", stats)
    metrics.observe_request("test-metrics-s", "draft_model", stats)  # ignored per exit
    per_exit = {"model": "test-metrics-s"}
    assert _value("specdec:num_draft_tokens_per_exit_total", **per_exit, exit="1") == 3
    assert _value("specdec:num_draft_tokens_per_exit_total", **per_exit, exit="3") == 2
    assert _value("specdec:num_accepted_tokens_per_exit_total", **per_exit, exit="1") == 2
    assert metrics.sample_value(
        "specdec:num_accepted_tokens_per_exit_total", {**per_exit, "exit": "3"}
    ) == 0  # the series exists at 0


def test_track_session_gauge_returns_to_zero_on_error():
    labels = {"service": "verifier", "model": "test-metrics-g"}
    try:
        with metrics.track_session("verifier", "test-metrics-g"):
            assert _value("specdec:num_active_sessions", **labels) == 1
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert _value("specdec:num_active_sessions", **labels) == 0


def test_token_latency_recorder_observes_ttft_once_and_itl_per_chunk():
    labels = {"service": "router", "model": "test-metrics-l"}
    rec = metrics.TokenLatencyRecorder("router", "test-metrics-l")
    rec.on_tokens(0)  # empty chunks do not count as the first token
    rec.on_tokens(2)
    rec.on_tokens(3)
    rec.on_tokens(1)
    rec.finish("length")
    rec.finish("length")  # idempotent
    assert _value("specdec:time_to_first_token_seconds_count", **labels) == 1
    assert _value("specdec:inter_token_latency_seconds_count", **labels) == 2
    assert _value("specdec:num_generation_tokens_total", **labels) == 6
    assert _value("specdec:num_requests_total", **labels, finish_reason="length") == 1


def test_metrics_server_exposes_colon_names():
    port = metrics.start_metrics_server(0)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "# TYPE specdec:num_drafts_total counter" in body
    assert "specdec:time_to_first_token_seconds_bucket" in body or "specdec:num_drafts" in body
    assert metrics.render_latest().decode().count("specdec:num_draft_tokens") >= 1
