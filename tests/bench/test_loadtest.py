"""`bench.loadtest`'s pure parts: per-request TPOT / ITL, percentiles, SLO goodput, the Poisson
schedule, SSE event folding, config merging, prompt selection, the load shapes (with a
fake `send`, no server) and what the HTTP client sends (to a server that records it)."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from bench.loadtest import (
    HttpLoadClient,
    Pass,
    Prompt,
    PromptCycle,
    RequestRecord,
    RequestShape,
    Slo,
    closed_loop,
    fitting_prompts,
    main,
    mean_batch_rows,
    merge_config,
    merged_row,
    observe_event,
    open_loop,
    parse_args,
    pass_order,
    percentiles,
    poisson_arrivals,
    pooled_rows,
    ratio_table,
    summarize,
    to_markdown,
)

# ---------------------------------------------------------------- one request


@pytest.mark.parametrize(
    "rec, tpot_s",
    [
        (RequestRecord(ok=True, ttft_s=0.5, e2e_s=1.5, num_tokens=11), 0.1),  # (1.5 - 0.5) / (11 - 1)
        (RequestRecord(ok=True, ttft_s=0.2, e2e_s=0.6, num_tokens=2), 0.4),  # two tokens: one gap
        (RequestRecord(ok=True, ttft_s=0.5, e2e_s=0.5, num_tokens=1), None),  # one token: no TPOT
        (RequestRecord(ok=False, ttft_s=0.5, e2e_s=1.0, num_tokens=5), None),  # failed
        (RequestRecord(ok=True, ttft_s=None, e2e_s=1.0, num_tokens=5), None),  # no token chunk seen
    ],
)
def test_tpot(rec, tpot_s):
    assert rec.tpot_s == pytest.approx(tpot_s)


def test_itl_is_the_gap_between_chunks():
    rec = RequestRecord(chunk_times_s=[0.5, 0.7, 1.5])
    assert rec.itls_s == pytest.approx([0.2, 0.8])
    assert RequestRecord(chunk_times_s=[0.5]).itls_s == []


# ---------------------------------------------------------------- statistics


def test_percentiles_interpolate_linearly():
    p = percentiles([4.0, 1.0, 3.0, 2.0])
    # rank q * (n - 1) over the sorted values: p90 at 2.7 -> 3 + 0.7, p99 at 2.97 -> 3 + 0.97
    assert p == pytest.approx({"mean": 2.5, "p50": 2.5, "p90": 3.7, "p99": 3.97})
    assert percentiles([5.0]) == {"mean": 5.0, "p50": 5.0, "p90": 5.0, "p99": 5.0}
    assert percentiles([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


SLO = Slo(ttft_s=1.0, tpot_s=0.05)


@pytest.mark.parametrize(
    "rec, met",
    [
        (RequestRecord(ok=True, ttft_s=0.2, e2e_s=1.2, num_tokens=21), True),  # TPOT 50 ms: on the bound
        (RequestRecord(ok=True, ttft_s=1.0, e2e_s=1.0, num_tokens=1), True),  # one token: TTFT alone
        (RequestRecord(ok=True, ttft_s=1.5, e2e_s=2.0, num_tokens=11), False),  # TTFT over
        (RequestRecord(ok=True, ttft_s=0.2, e2e_s=2.2, num_tokens=11), False),  # TPOT 200 ms
        (RequestRecord(ok=False, ttft_s=0.1, e2e_s=0.2, num_tokens=2), False),  # failed
    ],
)
def test_slo(rec, met):
    assert SLO.met_by(rec) is met


def test_summary_counts_goodput_and_keeps_rejections_apart_from_failures():
    fast = RequestRecord(ok=True, ttft_s=0.2, e2e_s=1.2, chunk_times_s=[0.2, 1.2], num_tokens=21,
                         token_source="usage", tau=3.0, rounds=(10, 6))  # fmt: skip
    slow = RequestRecord(ok=True, ttft_s=1.5, e2e_s=2.0, chunk_times_s=[1.5, 1.6, 2.0], num_tokens=11,
                         token_source="usage", tau=0.0, rounds=(10, 0))  # fmt: skip
    rejected = RequestRecord(rejected=True, error="HTTP 429: full", e2e_s=0.01)
    failed = RequestRecord(error="HTTP 500: boom", e2e_s=0.02)
    failed_again = RequestRecord(error="HTTP 500: boom", e2e_s=0.02)
    s = summarize([fast, slow, rejected, failed, failed_again], wall_s=2.0, cpu_s=0.5, slo=SLO)
    assert (s["requests"], s["completed"], s["rejected"], s["failed"]) == (5, 2, 1, 2)
    assert s["errors"] == ["HTTP 429: full", "HTTP 500: boom"]  # first of each, in order
    assert s["requests_per_s"] == 1.0  # 2 completed in 2 s
    assert s["output_tokens_per_s"] == (21 + 11) / 2.0
    assert s["goodput_requests_per_s"] == 0.5  # only `fast` meets the SLO
    assert s["ttft_s"]["mean"] == pytest.approx(0.85)  # completed requests only
    assert s["tpot_s"]["p50"] == pytest.approx((0.05 + 0.05) / 2)  # (2.0 - 1.5) / 10 = 0.05 too
    assert s["itl_s"]["mean"] == pytest.approx((1.0 + 0.1 + 0.4) / 3)  # every gap of every request
    assert s["e2e_s"]["p50"] == pytest.approx(1.6)
    assert s["tau"] == 3.0  # 0 means not reported
    assert s["drafted_share"] == 6 / 20  # steps that verified a draft, over all requests' steps
    assert s["client_cpu_share"] == 0.25
    assert s["token_sources"] == ["usage"]


def test_mean_batch_rows_from_histogram_deltas():
    assert mean_batch_rows([((10.0, 4.0), (30.0, 8.0))]) == 5.0  # 20 rows over 4 steps
    assert mean_batch_rows([((10.0, 4.0), (10.0, 4.0))]) is None  # no step in between
    assert mean_batch_rows([(None, (30.0, 8.0))]) is None  # the metric is absent
    # two passes: 20 rows over 4 steps, then 4 rows over 4 steps -> 24 / 8, not the mean of 5 and 1
    assert mean_batch_rows([((10.0, 4.0), (30.0, 8.0)), ((30.0, 8.0), (34.0, 12.0))]) == 3.0


def _method_row(method: str, per_pass: list[float], wall_s: float = 1.0) -> dict:
    """A level's row of `method` with these per-pass tok/s (each pass `wall_s` long)."""
    return {"target": "m", "protocol": "http", "load": "concurrency", "level": 4, "method": method,
            "wall_s": wall_s * len(per_pass), "output_tokens_per_s": float(np.mean(per_pass)),
            "pass_tokens_per_s": per_pass, "aa_ratio": None}  # fmt: skip


def test_a_ratio_cell_gives_the_standard_error_of_the_per_pass_ratios():
    rows = [_method_row("none", [100.0, 200.0, 100.0]), _method_row("ngram", [90.0, 220.0, 110.0])]
    table = "\n".join(ratio_table(rows))
    pairs = [0.9, 1.1, 1.1]  # pass i over pass i of none
    se = np.std(pairs, ddof=1) / np.sqrt(3)
    assert f"| m | http | c=4 | 133 | {420 / 400:.2f} ± {se:.2f} |" in table
    # passes that do not pair up (a method ran fewer): the ratio alone
    rows[1]["pass_tokens_per_s"] = [90.0, 220.0]
    assert f"| m | http | c=4 | 133 | {420 / 400:.2f} |" in "\n".join(ratio_table(rows))


def test_pooled_runs_sum_tokens_and_wall_time_and_concatenate_passes():
    run1 = [_method_row("none", [100.0, 100.0]), _method_row("ngram", [90.0, 110.0])]
    run2 = [_method_row("none", [200.0, 200.0], wall_s=3.0), _method_row("ngram", [180.0, 190.0], wall_s=3.0)]
    pooled = {r["method"]: r for r in pooled_rows([run1, run2])}
    assert pooled["none"]["pass_tokens_per_s"] == [100.0, 100.0, 200.0, 200.0]
    assert pooled["none"]["wall_s"] == 8.0
    assert pooled["none"]["output_tokens_per_s"] == pytest.approx((200 + 1200) / 8.0)
    assert pooled["ngram"]["output_tokens_per_s"] == pytest.approx((200 + 1110) / 8.0)
    assert pooled["none"]["aa_ratio"] == pytest.approx(1.0)  # passes 2 and 4 over 1 and 3
    pairs = [0.9, 1.1, 0.9, 0.95]
    se = np.std(pairs, ddof=1) / 2
    assert f"| {1310 / 1400:.2f} ± {se:.2f} |" in "\n".join(ratio_table(list(pooled.values())))


def test_pool_prints_the_pooled_table_of_saved_runs_and_starts_nothing(tmp_path, capsys):
    paths = []
    for i, rows in enumerate(([_method_row("none", [100.0, 100.0]), _method_row("ngram", [90.0, 110.0])],
                              [_method_row("none", [200.0, 200.0]), _method_row("ngram", [180.0, 190.0])])):  # fmt: skip
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps({"rows": rows}))
    assert main(["--pool", *map(str, paths)]) is None
    out = capsys.readouterr().out
    assert "Pooled: run0.json, run1.json" in out
    assert f"| m | http | c=4 | 150 | {570 / 600:.2f} ± " in out


def test_passes_alternate_the_method_order():
    methods = ["none", "ngram", "sorted"]
    assert [pass_order(methods, r) for r in range(3)] == [methods, methods[::-1], methods]


def test_a_merged_row_sums_its_passes_and_gives_the_aa_ratio():
    def one_pass(tokens: int, wall_s: float) -> Pass:
        return Pass([RequestRecord(ok=True, ttft_s=0.1, e2e_s=1.0, num_tokens=tokens)], wall_s, 0.1, None, None)

    row = merged_row([one_pass(100, 1.0), one_pass(100, 2.0), one_pass(300, 1.0), one_pass(100, 2.0)], SLO)
    assert row["output_tokens_per_s"] == 600 / 6.0  # summed tokens over summed wall time
    assert row["requests"] == 4
    assert row["pass_tokens_per_s"] == [100.0, 50.0, 300.0, 50.0]
    assert row["aa_ratio"] == pytest.approx(50.0 / 200.0)  # passes 2 and 4 over passes 1 and 3
    assert merged_row([one_pass(100, 1.0)], SLO)["aa_ratio"] is None


# ---------------------------------------------------------------- Poisson schedule


class FixedExponential:
    """Stands in for np.random.Generator: unit gaps from a list, scaled."""

    def __init__(self, unit_gaps: list[float]) -> None:
        self.unit_gaps = iter(unit_gaps)

    def exponential(self, scale: float) -> float:
        return scale * next(self.unit_gaps)


def test_poisson_arrivals_are_running_sums_of_gaps_within_the_duration():
    # rate 2/s: mean gap 0.5 s, so unit gaps 0.5, 1, 2, 4 are 0.25, 0.5, 1, 2 s apart
    assert poisson_arrivals(2.0, 1.5, FixedExponential([0.5, 1.0, 2.0, 4.0])) == [0.25, 0.75]
    assert poisson_arrivals(2.0, 0.2, FixedExponential([0.5])) == []  # first arrival after the end


def test_poisson_arrivals_are_seeded_and_have_the_rate():
    a = poisson_arrivals(8.0, 500.0, np.random.default_rng(1))
    assert a == poisson_arrivals(8.0, 500.0, np.random.default_rng(1))
    assert a[:10] != poisson_arrivals(8.0, 500.0, np.random.default_rng(2))[:10]
    assert len(a) / 500.0 == pytest.approx(8.0, rel=0.05)  # 4000 arrivals: sd of the count ~1.6 %
    assert np.all(np.diff(a) > 0) and 0.0 < a[0] and a[-1] < 500.0
    assert np.mean(np.diff(a)) == pytest.approx(1 / 8.0, rel=0.05)


# ---------------------------------------------------------------- SSE events


def test_specdec_events_count_token_ids_and_read_usage_and_tau():
    rec = RequestRecord()
    observe_event(rec, {"choices": [{"text": "ab"}], "specdec": {"token_ids": [1, 2, 3]}}, 0.1)
    observe_event(rec, {"choices": [{"text": "c"}], "specdec": {"token_ids": [4]}}, 0.3)
    assert (rec.ttft_s, rec.chunk_times_s, rec.num_tokens, rec.token_source) == (0.1, [0.1, 0.3], 4, "token_ids")
    final = {"choices": [{"text": "", "finish_reason": "length"}], "usage": {"completion_tokens": 5},
             "specdec": {"token_ids": [], "stats": {"mean_acceptance_length": 2.5, "num_rounds": 3,
                                                    "num_spec_rounds": 2}}}  # fmt: skip
    observe_event(rec, final, 0.4)
    assert rec.chunk_times_s == [0.1, 0.3]  # a chunk without tokens is no arrival
    assert (rec.num_tokens, rec.token_source, rec.tau, rec.rounds) == (5, "usage", 2.5, (3, 2))


def test_plain_openai_events_count_chunks_as_a_lower_bound_until_usage():
    rec = RequestRecord()
    observe_event(rec, {"choices": [{"text": "def"}]}, 0.2)
    observe_event(rec, {"choices": [{"text": ""}]}, 0.25)  # empty text: no token counted
    observe_event(rec, {"choices": [{"text": " f"}]}, 0.3)
    assert (rec.num_tokens, rec.token_source, rec.tau) == (2, "chunks", None)
    observe_event(rec, {"choices": [], "usage": {"completion_tokens": 7}}, 0.35)  # vLLM's usage chunk
    assert (rec.num_tokens, rec.token_source, rec.ttft_s) == (7, "usage", 0.2)


# ---------------------------------------------------------------- config, prompts, arguments


def test_merge_config_merges_mappings_and_replaces_the_rest():
    base = {"http_port": 8000, "limits": {"a": 1, "b": 2}, "targets": [{"name": "m"}, {"name": "s"}]}
    override = {"limits": {"b": 3}, "targets": [{"name": "s", "max_batch_rows": 4}]}
    assert merge_config(base, override) == {
        "http_port": 8000, "limits": {"a": 1, "b": 3}, "targets": [{"name": "s", "max_batch_rows": 4}],
    }  # fmt: skip
    assert base["limits"] == {"a": 1, "b": 2}  # not modified


def test_fitting_prompts_drop_long_and_repeated_ones():
    assert fitting_prompts(["abc", "abcdef", "ab", "abc"], len, max_prompt_tokens=3) == ["abc", "ab"]


def test_prompt_cycle_wraps_around():
    next_prompt = PromptCycle(["a", "b", "c"], seed=7)
    prompts = [next_prompt() for _ in range(5)]
    assert [p.text for p in prompts] == ["a", "b", "c", "a", "b"]
    assert [p.seed for p in prompts] == [7, 8, 9, 10, 11]  # a prompt's second turn draws anew


@pytest.mark.parametrize(
    "argv",
    [
        ["--http-url", "http://127.0.0.1:1", "--protocols", "grpc"],  # gRPC without its address
        ["--grpc-address", "127.0.0.1:1"],  # HTTP (the default) without its URL
        ["--concurrency"],  # nothing to run
    ],
)
def test_arguments_that_cannot_run_are_refused(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_markdown_says_na_for_what_the_server_does_not_report():
    args = parse_args(["--http-url", "http://127.0.0.1:1"])
    row = {"target": "m", "method": "default", "protocol": "http", "load": "rate", "level": 2.0,
           **summarize([RequestRecord(ok=True, ttft_s=0.1, e2e_s=0.1, num_tokens=1, token_source="chunks")],
                       1.0, 0.1, SLO), "mean_batch_rows": None}  # fmt: skip
    text = to_markdown([row], args, {"time": "now"})
    assert "| m | default | http | 2 req/s | 1/1 | 0 | 0 |" in text
    assert "| n/a | n/a | n/a | 10% |" in text  # tau, drafted, batch rows, client CPU
    assert "lower bound" in text
    assert "over `none`" not in text  # no `none` row: no ratios


def test_markdown_gives_each_method_over_none_at_the_same_level():
    args = parse_args(["--http-url", "http://127.0.0.1:1"])

    def row(method: str, level: int, tokens: int, aa: float | None) -> dict:
        rec = RequestRecord(ok=True, ttft_s=0.1, e2e_s=1.0, num_tokens=tokens)
        return {"target": "m", "method": method, "protocol": "http", "load": "concurrency", "level": level,
                **summarize([rec], 1.0, 0.1, SLO), "mean_batch_rows": None, "aa_ratio": aa}  # fmt: skip

    rows = [row("none", 1, 100, 0.98), row("sorted", 1, 150, 1.0), row("none", 8, 400, 1.03), row("sorted", 8, 380, 1.0)]
    text = to_markdown(rows, args, {"time": "now"})
    assert "| target | protocol | load | none tok/s | sorted / none | none A/A |" in text
    assert "| m | http | c=1 | 100 | 1.50 | 0.98 |" in text
    assert "| m | http | c=8 | 400 | 0.95 | 1.03 |" in text


# ---------------------------------------------------------------- load shapes


class FakeServer:
    """`send` that takes `latency_s` and records how many requests were in flight."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s, self.in_flight, self.max_in_flight, self.prompts = latency_s, 0, 0, []

    async def send(self, prompt: Prompt) -> RequestRecord:
        self.prompts.append(prompt.text)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(self.latency_s)
        self.in_flight -= 1
        return RequestRecord(ok=True)


async def test_closed_loop_keeps_concurrency_requests_in_flight():
    server, done = FakeServer(0.01), []
    records = await closed_loop(server.send, PromptCycle(["a", "b", "c"]), 4, 10, lambda: done.append(1))
    assert len(records) == len(done) == 10
    assert server.max_in_flight == 4
    assert server.prompts == ["a", "b", "c"] * 3 + ["a"]


async def test_open_loop_sends_at_the_arrival_times_whatever_is_in_flight():
    server, done = FakeServer(0.2), []
    records = await open_loop(server.send, PromptCycle(["a", "b"]), [0.0, 0.01, 0.02], lambda: done.append(1))
    assert len(records) == len(done) == 3
    assert server.max_in_flight == 3  # nobody waited for an answer
    assert server.prompts == ["a", "b", "a"]


# ---------------------------------------------------------------- what the client sends


class RecordingHandler(BaseHTTPRequestHandler):
    """Answers every completion with an empty SSE stream and keeps the request bodies."""

    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        payload = b"data: [DONE]\n\n"
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def recording_server():
    RecordingHandler.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", RecordingHandler.bodies
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("temperature, seeded", [(0.8, True), (0.0, False)])
async def test_a_sampled_request_carries_its_prompts_seed(recording_server, temperature, seeded):
    url, bodies = recording_server
    client = HttpLoadClient(url, RequestShape(8, temperature), 2, 5.0, 5.0, None)
    try:
        next_prompt = PromptCycle(["a", "b"], seed=40)
        for _ in range(3):
            await client.send("m", next_prompt(), "ngram")
    finally:
        await client.close()
    assert [b["prompt"] for b in bodies] == ["a", "b", "a"]
    assert [b.get("seed") for b in bodies] == ([40, 41, 42] if seeded else [None] * 3)  # greedy: none sent
