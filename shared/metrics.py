"""Prometheus metrics of every service, with vLLM-style names (`specdec:` prefix).

One module-level set of collectors per process (the default registry): the router, each
verifier and the drafter pool run in their own processes and each exposes its own
`/metrics` (services via `start_metrics_server(port)`, the router on its HTTP app via
`render_latest()`). Names with ':' are legal Prometheus names (recording-rule style).

Spec-decode counters (labels `model`, `method`; `position` for the per-position one) follow
vLLM's `SpecDecodingProm`: one *draft* is one speculative round that carried at least one
draft token (rounds run with k = 0 are not drafts), so mean acceptance length τ is
1 + accepted / drafts, the same τ as `SpecStats.mean_acceptance_length`.

Latency histograms are observed where tokens leave a service towards the client
(router: end to end; verifier: from the start of its Generate to its chunks):
  - `time_to_first_token_seconds`: request start → first chunk carrying a token;
  - `inter_token_latency_seconds`: time between two chunks divided by the number of tokens
    in the later chunk, observed once per chunk (a round emits 1..k+1 tokens at once, so
    this is the per-token latency the client sees, averaged within a chunk).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from shared.types import SpecStats

# NOTE: `*_created` series double the output and nothing here reads them (vLLM does the same).
prometheus_client.disable_created_metrics()

CONTENT_TYPE_LATEST = prometheus_client.CONTENT_TYPE_LATEST

_SPEC_LABELS = ["model", "method"]
_SERVICE_LABELS = ["service", "model"]

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
)  # fmt: skip
_TTFT_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class SpecDecodingProm:
    """Spec-decode counters in Prometheus (vLLM `SpecDecodingProm`, per model and method).

    Counters are exported with the `_total` suffix. Draft-token acceptance rate:

      sum by (model, method) (rate(specdec:num_accepted_tokens_total[$interval]))
      / sum by (model, method) (rate(specdec:num_draft_tokens_total[$interval]))

    Mean acceptance length τ (conventionally including the recovered or bonus token):

      1 + sum by (model, method) (rate(specdec:num_accepted_tokens_total[$interval]))
      / sum by (model, method) (rate(specdec:num_drafts_total[$interval]))

    Per-position acceptance rate (share of drafts whose token at `position` was accepted):

      sum by (model, method, position) (rate(specdec:num_accepted_tokens_per_pos_total[$interval]))
      / on (model, method) group_left
      sum by (model, method) (rate(specdec:num_drafts_total[$interval]))

    Nested (`sorted`) drafters, per exit depth (label `exit`): acceptance rate of the draft
    tokens that left at each exit:

      sum by (model, exit) (rate(specdec:num_accepted_tokens_per_exit_total[$interval]))
      / sum by (model, exit) (rate(specdec:num_draft_tokens_per_exit_total[$interval]))
    """

    def __init__(self) -> None:
        self.num_drafts = Counter(
            "specdec:num_drafts",
            "Speculative rounds that carried at least one draft token.",
            _SPEC_LABELS,
        )
        self.num_draft_tokens = Counter(
            "specdec:num_draft_tokens", "Draft tokens proposed and verified.", _SPEC_LABELS
        )
        self.num_accepted_tokens = Counter(
            "specdec:num_accepted_tokens", "Draft tokens the target accepted.", _SPEC_LABELS
        )
        self.num_accepted_tokens_per_pos = Counter(
            "specdec:num_accepted_tokens_per_pos",
            "Accepted draft tokens per draft position (0 = first draft token).",
            [*_SPEC_LABELS, "position"],
        )
        self.num_rounds = Counter(
            "specdec:num_rounds",
            "Target forwards after prefill (k = 0 rounds included).",
            _SPEC_LABELS,
        )
        self.num_draft_tokens_per_exit = Counter(
            "specdec:num_draft_tokens_per_exit",
            "Draft tokens of nested (sorted) drafters by the exit depth they left at.",
            ["model", "exit"],
        )
        self.num_accepted_tokens_per_exit = Counter(
            "specdec:num_accepted_tokens_per_exit",
            "Accepted draft tokens of nested (sorted) drafters by exit depth.",
            ["model", "exit"],
        )

    def observe(self, model: str, method: str, stats: SpecStats) -> None:
        """Add one finished (or aborted) request's `SpecStats`."""
        self.num_rounds.labels(model, method).inc(stats.num_rounds)
        self.num_drafts.labels(model, method).inc(stats.num_spec_rounds)
        self.num_draft_tokens.labels(model, method).inc(stats.num_draft_tokens)
        self.num_accepted_tokens.labels(model, method).inc(stats.num_accepted_tokens)
        for pos, count in enumerate(stats.num_accepted_per_pos):
            if count:
                self.num_accepted_tokens_per_pos.labels(model, method, str(pos)).inc(count)
        if method != "sorted":
            return
        for exit_layer, count in stats.num_draft_tokens_per_exit.items():
            self.num_draft_tokens_per_exit.labels(model, str(exit_layer)).inc(count)
            accepted = stats.num_accepted_tokens_per_exit.get(exit_layer, 0)
            # NOTE: inc(0) too, so an exit whose tokens were all rejected still has a series
            self.num_accepted_tokens_per_exit.labels(model, str(exit_layer)).inc(accepted)


SPEC_DECODING = SpecDecodingProm()

NUM_ACTIVE_SESSIONS = Gauge(
    "specdec:num_active_sessions",
    "Generation sessions in progress (router: relayed streams; verifier: loops; drafter: "
    "open Draft streams).",
    _SERVICE_LABELS,
)
NUM_REQUESTS = Counter(
    "specdec:num_requests",
    "Finished requests by finish reason (stop, length, abort, error).",
    [*_SERVICE_LABELS, "finish_reason"],
)
NUM_GENERATION_TOKENS = Counter(
    "specdec:num_generation_tokens", "Tokens streamed to clients.", _SERVICE_LABELS
)
TIME_TO_FIRST_TOKEN = Histogram(
    "specdec:time_to_first_token_seconds",
    "Request start to the first streamed token.",
    _SERVICE_LABELS,
    buckets=_TTFT_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "specdec:inter_token_latency_seconds",
    "Time between streamed chunks divided by the tokens in the later chunk.",
    _SERVICE_LABELS,
    buckets=_LATENCY_BUCKETS,
)
DRAFTER_BATCH_SIZE = Histogram(
    "specdec:drafter_batch_size",
    "Sessions whose drafts one drafter forward computed together.",
    ["drafter"],
    buckets=_BATCH_BUCKETS,
)

# verifier step loop and request queue (label `model`: the target)
BATCH_ROWS = Histogram(
    "specdec:batch_rows", "Rows (requests) in one target step of a verifier.", ["model"],
    buckets=_BATCH_BUCKETS,
)
STEP_TOKENS = Histogram(
    "specdec:step_tokens", "Tokens one target step fed (prompt chunks + pending + drafts).", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
LATE_DRAFTS = Counter(
    "specdec:num_late_drafts", "Rows that ran a step with k = 0 because their remote draft was late.",
    ["model"],
)
NUM_QUEUED_REQUESTS = Gauge(
    "specdec:num_queued_requests", "Requests waiting in a verifier's queue for a batch row.", ["model"]
)
QUEUE_TIME = Histogram(
    "specdec:queue_time_seconds", "Time a request waited in a verifier's queue before its first step.",
    ["model"], buckets=_TTFT_BUCKETS,
)
NUM_REJECTED_REQUESTS = Counter(
    "specdec:num_rejected_requests", "Requests refused (queue full) or dropped (queue timeout) by a verifier.",
    ["model", "reason"],
)

STORE_CALLS = Counter(
    "specdec:store_calls", "Store calls by outcome (ok, error, breaker_open, auth_error).",
    ["store", "op", "outcome"],
)
STORE_UP = Gauge("specdec:store_up", "1 while the store answers, 0 after a failed call.", ["store"])
STORE_BAD_VALUES = Counter(
    "specdec:store_bad_values", "Values under our keys that could not be parsed (ignored).", ["store"]
)
SHARED_NGRAM_FETCHES = Counter(
    "specdec:shared_ngram_fetches",
    "Shared n-gram table lookups by result: hit (a continuation used), stale (arrived but no longer "
    "aligned with the emitted tokens), guarded (the contamination guard held it back), empty (no entry), "
    "late (not yet arrived), failed (store down); and local: answered from the verifier's recent "
    "answers without asking the store (then also counted by how it was used).",
    ["model", "result"],
)
SHARED_NGRAM_TOKENS = Counter(
    "specdec:shared_ngram_tokens", "Draft tokens from the shared n-gram table: drafted and accepted.",
    ["model", "outcome"],
)
POLICY_STATS = Counter(
    "specdec:policy_stats",
    "The policy's statistics in the store (verifier_service.policy_stats): arms seeded at start-up, "
    "start-up reads failed (read_failed: a cold start), writes written and write_failed.",
    ["model", "event"],
)
DRAFT_CACHE_LOOKUPS = Counter(
    "specdec:draft_cache_lookups",
    "Draft cache lookups (one per request, by its prompt) by result: hit (an entry arrived), miss (none), "
    "bad (a value that is not ours, ignored), failed (store down); and entries dropped mid-request: "
    "divergent (the emitted tokens left the cached continuation).",
    ["model", "result"],
)
DRAFT_CACHE_TOKENS = Counter(
    "specdec:draft_cache_tokens", "Draft tokens from the draft cache: drafted and accepted.", ["model", "outcome"]
)
DRAFT_CACHE_WRITES = Counter(
    "specdec:draft_cache_writes", "Greedy outputs queued for the draft cache (written or failed).", ["model", "outcome"]
)


def observe_request(model: str, method: str, stats: SpecStats) -> None:
    """Record one request's speculation stats (call once per request, where the loop ran)."""
    SPEC_DECODING.observe(model, method, stats)


@contextmanager
def track_session(service: str, model: str) -> Iterator[None]:
    """`specdec:num_active_sessions{service, model}` is one higher while the block runs."""
    gauge = NUM_ACTIVE_SESSIONS.labels(service, model)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


class TokenLatencyRecorder:
    """Observes TTFT and inter-token latency for one streamed request.

    Create it when the request starts; call `on_tokens(n)` for every chunk sent (n ≥ 0;
    chunks with no tokens are ignored) and `finish(reason)` once at the end.
    """

    __slots__ = ("_model", "_service", "_start", "_last", "_finished")

    def __init__(self, service: str, model: str) -> None:
        self._service = service
        self._model = model
        self._start = time.perf_counter()
        self._last: float | None = None
        self._finished = False

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = time.perf_counter()
        labels = (self._service, self._model)
        if self._last is None:
            TIME_TO_FIRST_TOKEN.labels(*labels).observe(now - self._start)
        else:
            INTER_TOKEN_LATENCY.labels(*labels).observe((now - self._last) / num_tokens)
        NUM_GENERATION_TOKENS.labels(*labels).inc(num_tokens)
        self._last = now

    def finish(self, finish_reason: str) -> None:
        if not self._finished:
            self._finished = True
            NUM_REQUESTS.labels(self._service, self._model, finish_reason).inc()


_server_lock = threading.Lock()


def start_metrics_server(port: int, addr: str = "127.0.0.1") -> int:
    """Serve the default registry on `http://addr:port/metrics` in a daemon thread.

    `port=0` picks a free port; returns the bound port (services print it for tests).
    """
    with _server_lock:
        httpd, _thread = prometheus_client.start_http_server(port, addr=addr)
    return int(httpd.server_port)


def render_latest() -> bytes:
    """The default registry in the text exposition format (for the router's `/metrics`)."""
    return prometheus_client.generate_latest(prometheus_client.REGISTRY)


def sample_value(name: str, labels: dict[str, str] | None = None) -> float | None:
    """Current value of one sample in this process's registry (tests and logs)."""
    return prometheus_client.REGISTRY.get_sample_value(name, labels or {})
