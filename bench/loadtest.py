"""Load test: throughput and latency of a serving cluster under concurrency or Poisson load.

Drives `specdec serve` (OpenAI HTTP or gRPC), or any OpenAI-compatible server, with a
closed-loop concurrency sweep and open-loop Poisson arrivals:

    python -m bench.loadtest                                    # starts specdec serve itself
    python -m bench.loadtest --methods none ngram sorted --concurrency 1 8 32 --temperature 0.8
    python -m bench.loadtest --http-url http://127.0.0.1:8000   # a running specdec serve
    python -m bench.loadtest --protocols http grpc --http-url http://127.0.0.1:8000 \\
        --grpc-address 127.0.0.1:50051
    python -m bench.loadtest --rates 2 4 8 --duration-s 30 --concurrency   # open loop only
    python -m bench.loadtest --http-url http://127.0.0.1:8001 --targets my-model \\
        --methods default --tokenizer /path/to/tokenizer                   # e.g. vLLM
    python -m bench.loadtest --config cfg.yaml --dataset spec_bench        # YAML over the default

Without `--http-url` / `--grpc-address` the tool starts `specdec serve` (the default config,
`--config` YAML merged over it, only the `--targets`) and stops it at the end.

Closed loop: at each `--concurrency` level that many workers send requests back to back,
`--requests-per-level` in all (default max(2 x level, 16)). `--repeats N` runs each level's
methods N times, in alternating order, and sums each method's passes: on a shared machine
one pass of a method against one of another differs by several per cent with nothing
changed, which the `none` row's A/A ratio (its even passes over its odd ones) shows. Open loop: requests arrive as a
Poisson process at each of `--rates` (req/s) for `--duration-s`, whatever the server's pace
(seeded by `--seed`; the same schedule for every target and method). A sampled request
(`--temperature` > 0) carries a seed (`--seed` + its number in its method's sequence), so the
n-th request of every method draws the same tokens.

Prompts are distinct as far as the data set allows (HumanEval, MT-Bench or Spec-Bench first
turns from ../shared/data, taken in order and cycled; each target, method and protocol starts
at the first, so they all see the same prompts):
only those of at most `--max-prompt-tokens` (default 256 - `--max-tokens`, the demo models'
window) by the target's tokenizer, or by `--tokenizer`, or else by a budget of 2 characters
per token. `--methods` are sent as specdec's `method` extension, except `default`, which sends
none (the server's default; any OpenAI server).

Nothing is retried: HTTP 429 and gRPC RESOURCE_EXHAUSTED count as rejected, any other error
as failed (the first messages are kept); the gRPC client runs with attempts=1.

Per (target, method, protocol, level): requests/s, output tokens/s, TTFT, TPOT, ITL and
end-to-end latency (mean, p50, p90, p99), goodput (requests/s meeting TTFT <= `--slo-ttft-s`
and TPOT <= `--slo-tpot-ms`), rejected and failed counts, tau (mean acceptance length over
the requests that report one), mean batch rows per verifier step (the `specdec:batch_rows`
histogram before and after, when a scraped /metrics has it; n/a otherwise) and the tool's
own CPU use (user + system seconds over wall seconds).
TPOT = (end-to-end - TTFT) / (tokens - 1), for requests of at least 2 tokens. ITL is the
time between received chunks: a speculative chunk carries several tokens, so ITL is per
chunk, not per token. Tokens come from `usage.completion_tokens`, else from specdec's
per-chunk `token_ids`, else one per non-empty chunk (a lower bound; the report says which).

Results: `--out-dir` (bench/results)/loadtest-<time>.{json,md,png}. `--pool a.json b.json`
prints the ratio table of several runs' passes together (more passes, a smaller error).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gzip
import json
import resource
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bench.common import RESULTS_DIR, environment
from shared.paths import data_dir

DEMO_WINDOW = 256  # tokens the demo models were trained on: prompt + completion
CHARS_PER_TOKEN_FLOOR = 2  # prompt budget without a tokenizer (the data sets average 2.5-2.9)
HTTP_TOO_MANY_REQUESTS = 429
BATCH_ROWS = "specdec:batch_rows"
DEFAULT_METHOD = "default"  # --methods value that sends no `method` field
ERRORS_KEPT = 3
KEEPALIVE_EXPIRY_S = 2.0  # below common servers' keep-alive (see HttpLoadClient)


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it; times in seconds from when it was sent."""

    ok: bool = False
    rejected: bool = False  # HTTP 429 / RESOURCE_EXHAUSTED
    error: str = ""
    ttft_s: float | None = None  # first chunk that carries a token
    e2e_s: float = 0.0
    chunk_times_s: list[float] = field(default_factory=list)  # arrival of each chunk with tokens
    num_tokens: int = 0
    token_source: str = ""  # usage | token_ids | chunks (a lower bound)
    tau: float | None = None  # mean acceptance length, when the server reports it
    rounds: tuple[int, int] = (0, 0)  # (target steps, those that verified a draft), when reported

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.num_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times_s, self.chunk_times_s[1:])]


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_s: float
    tpot_s: float

    def met_by(self, rec: RequestRecord) -> bool:
        """Completed within the TTFT bound, and the TPOT bound when TPOT exists (>= 2 tokens)."""
        if not rec.ok or rec.ttft_s is None or rec.ttft_s > self.ttft_s:
            return False
        tpot = rec.tpot_s
        return tpot is None or tpot <= self.tpot_s


# ---------------------------------------------------------------- pure arithmetic


def percentiles(values: list[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 (numpy's linear interpolation); None for no values."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def poisson_arrivals(rate: float, duration_s: float, rng: np.random.Generator) -> list[float]:
    """Arrival times in [0, duration_s) of a Poisson process of `rate` per second: running
    sums of exponential gaps with mean 1 / rate."""
    assert rate > 0 and duration_s > 0
    times, t = [], rng.exponential(1.0 / rate)
    while t < duration_s:
        times.append(float(t))
        t += rng.exponential(1.0 / rate)
    return times


def rounds_of(stats: dict) -> tuple[int, int]:
    return int(stats.get("num_rounds") or 0), int(stats.get("num_spec_rounds") or 0)


def summarize(records: list[RequestRecord], wall_s: float, cpu_s: float, slo: Slo) -> dict:
    """One level's row (without its labels); rates are over the level's wall time."""
    ok = [r for r in records if r.ok]
    taus = [r.tau for r in ok if r.tau]  # 0 = not reported (a proto default)
    return {
        "requests": len(records),
        "completed": len(ok),
        "rejected": sum(r.rejected for r in records),
        "failed": sum(not r.ok and not r.rejected for r in records),
        "errors": list(dict.fromkeys(r.error for r in records if r.error))[:ERRORS_KEPT],
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s,
        "output_tokens_per_s": sum(r.num_tokens for r in ok) / wall_s,
        "goodput_requests_per_s": sum(slo.met_by(r) for r in ok) / wall_s,
        "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": percentiles([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_s": percentiles([x for r in ok for x in r.itls_s]),
        "e2e_s": percentiles([r.e2e_s for r in ok]),
        "tau": float(np.mean(taus)) if taus else None,
        # what share of the target's steps drafted (the load-aware policy may go plain)
        "drafted_share": (sum(r.rounds[1] for r in ok) / total) if (total := sum(r.rounds[0] for r in ok)) else None,
        "token_sources": sorted({r.token_source for r in ok}),
        "client_cpu_share": cpu_s / wall_s,
    }


def merge_config(base: dict, override: dict) -> dict:
    """`override` over `base`: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for key, value in override.items():
        both_maps = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_config(out[key], value) if both_maps else value
    return out


# ---------------------------------------------------------------- prompts


def load_prompts(dataset: str) -> list[str]:
    """HumanEval's `prompt`s, or the first of MT-Bench's / Spec-Bench's `turns`."""
    root = data_dir()
    if dataset == "humaneval":
        with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
            return [json.loads(line)["prompt"] for line in f]
    with open(root / dataset / "question.jsonl") as f:
        return [json.loads(line)["turns"][0] for line in f]


def fitting_prompts(prompts: list[str], num_tokens: Callable[[str], int], max_prompt_tokens: int) -> list[str]:
    """The distinct prompts of at most `max_prompt_tokens` tokens, in order."""
    return [p for p in dict.fromkeys(prompts) if num_tokens(p) <= max_prompt_tokens]


def token_counter(tokenizer_dir: Path | None) -> Callable[[str], int]:
    if tokenizer_dir is None:
        return lambda text: -(-len(text) // CHARS_PER_TOKEN_FLOOR)
    from shared.loading import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    return lambda text: len(tokenizer(text).input_ids)


class Prompt(NamedTuple):
    text: str
    seed: int  # of a sampled request: the n-th request of every method draws the same tokens


class PromptCycle:
    """Prompts in order, wrapping around: each request gets the next one, and a seed of its
    own (`seed` + its number). Seeded, a sampled request's tokens do not depend on the method
    (speculation is lossless), so every method's pass does the same work and a ratio of
    two methods measures speed alone; unseeded, sampled outputs of different lengths moved
    a method's pass by several per cent."""

    def __init__(self, prompts: list[str], seed: int = 0) -> None:
        assert prompts, "no prompt fits the token budget"
        self.prompts, self.seed, self.next_index = prompts, seed, 0

    def __call__(self) -> Prompt:
        prompt = Prompt(self.prompts[self.next_index % len(self.prompts)], self.seed + self.next_index)
        self.next_index += 1
        return prompt


# ---------------------------------------------------------------- clients


@dataclass(frozen=True, slots=True)
class RequestShape:
    max_tokens: int
    temperature: float

    def seed(self, prompt: Prompt) -> int | None:
        """The seed a request for `prompt` carries: its own when sampled, none when greedy."""
        return prompt.seed if self.temperature > 0 else None


def observe_event(rec: RequestRecord, event: dict, now_s: float) -> None:
    """Fold one OpenAI completion SSE event into `rec` (specdec's extension is optional)."""
    ext = event.get("specdec") or {}
    choices = event.get("choices") or [{}]
    if "token_ids" in ext:
        n, rec.token_source = len(ext["token_ids"]), "token_ids"
    else:
        n = int(bool(choices[0].get("text")))
        rec.token_source = rec.token_source or "chunks"
    if n:
        if rec.ttft_s is None:
            rec.ttft_s = now_s
        rec.chunk_times_s.append(now_s)
        rec.num_tokens += n
    if ext.get("stats"):
        rec.tau, rec.rounds = ext["stats"].get("mean_acceptance_length"), rounds_of(ext["stats"])
    if event.get("usage"):
        rec.num_tokens, rec.token_source = event["usage"]["completion_tokens"], "usage"


class HttpLoadClient:
    """`POST /v1/completions` with `stream: true`, one pooled httpx.AsyncClient."""

    def __init__(self, base_url: str, shape: RequestShape, max_connections: int, timeout_s: float,
                 connect_timeout_s: float, api_key: str | None) -> None:  # fmt: skip
        import httpx

        self.shape = shape
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"authorization": f"Bearer {api_key}"} if api_key else {},
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            # NOTE: idle connections expire before the server's keep-alive does (uvicorn's and
            # vLLM's: 5 s, httpx's default expiry too): a connection reused as the server closes
            # it fails with a ReadError before any response (seen once in 256 requests when a
            # pass of 64 workers started on connections idle since the previous pass)
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                                keepalive_expiry=KEEPALIVE_EXPIRY_S),
        )

    async def send(self, model: str, prompt: Prompt, method: str | None) -> RequestRecord:
        body = {"model": model, "prompt": prompt.text, "max_tokens": self.shape.max_tokens,
                "temperature": self.shape.temperature, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        if (seed := self.shape.seed(prompt)) is not None:
            body["seed"] = seed
        if method is not None:
            body["method"] = method
        rec, t0 = RequestRecord(), time.perf_counter()
        answered = False
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as response:
                answered = True
                if response.status_code != 200:
                    rec.rejected = response.status_code == HTTP_TOO_MANY_REQUESTS
                    body = (await response.aread())[:200].decode(errors="replace")
                    rec.error = f"HTTP {response.status_code}: {body}"
                    return rec
                async for line in response.aiter_lines():
                    if not line.startswith("data:") or (data := line[5:].strip()) == "[DONE]":
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        rec.error = f"in-band error: {event['error'].get('message')}"
                        return rec
                    observe_event(rec, event, time.perf_counter() - t0)
            rec.ok = True
        except Exception as e:  # noqa: BLE001 - every other failure is counted, never retried
            where = f"after {rec.num_tokens} tokens" if answered else "before any response"
            rec.error = f"{type(e).__name__}: {e} ({where})"
        finally:
            rec.e2e_s = time.perf_counter() - t0
        return rec

    async def close(self) -> None:
        await self.client.aclose()


class GrpcLoadClient:
    """`router.client.AsyncSpecdecClient` with attempts=1 (its retries off), one channel."""

    def __init__(self, address: str, shape: RequestShape, timeout_s: float, api_key: str | None) -> None:
        from router.client import AsyncSpecdecClient

        self.shape = shape
        self.client = AsyncSpecdecClient(address, api_key=api_key, timeout_s=timeout_s, attempts=1)

    async def send(self, model: str, prompt: Prompt, method: str | None) -> RequestRecord:
        import grpc

        from router.client import Chunk, ClientError

        rec, t0 = RequestRecord(), time.perf_counter()
        try:
            async for item in self.client.stream(model, prompt.text, max_new_tokens=self.shape.max_tokens,
                                                 temperature=self.shape.temperature, seed=self.shape.seed(prompt),
                                                 method=method or ""):  # fmt: skip
                now = time.perf_counter() - t0
                if isinstance(item, Chunk):
                    if item.token_ids:
                        rec.ttft_s = now if rec.ttft_s is None else rec.ttft_s
                        rec.chunk_times_s.append(now)
                else:
                    rec.num_tokens, rec.token_source = item.completion_tokens, "usage"
                    rec.tau, rec.rounds = item.stats.get("mean_acceptance_length"), rounds_of(item.stats)
                    rec.ok = True
            if not rec.ok:
                rec.error = "the stream ended without a completion"
        except ClientError as e:
            rec.rejected = e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            rec.error = str(e)
        except Exception as e:  # noqa: BLE001 - counted, never retried
            rec.error = f"{type(e).__name__}: {e}"
        finally:
            rec.e2e_s = time.perf_counter() - t0
        return rec

    async def close(self) -> None:
        await self.client.close()


# ---------------------------------------------------------------- load shapes


async def closed_loop(send: Callable, next_prompt: PromptCycle, concurrency: int, num_requests: int,
                      on_done: Callable[[], None]) -> list[RequestRecord]:  # fmt: skip
    """`concurrency` workers sending `num_requests` requests back to back."""
    remaining = iter(range(num_requests))
    records: list[RequestRecord] = []

    async def worker() -> None:
        for _ in remaining:
            records.append(await send(next_prompt()))
            on_done()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


async def open_loop(send: Callable, next_prompt: PromptCycle, arrivals_s: list[float],
                    on_done: Callable[[], None]) -> list[RequestRecord]:  # fmt: skip
    """One request at each arrival time (s from now), however many are in flight."""
    t0 = time.perf_counter()

    async def one(at_s: float, prompt: str) -> RequestRecord:
        await asyncio.sleep(at_s - (time.perf_counter() - t0))
        rec = await send(prompt)
        on_done()
        return rec

    return list(await asyncio.gather(*(one(at, next_prompt()) for at in arrivals_s)))


# ---------------------------------------------------------------- server side


class BatchRowsProbe:
    """(sum, count) of the `specdec:batch_rows` histogram of one target over /metrics URLs;
    None when no URL answers with it (another server, or metrics behind a key we lack)."""

    def __init__(self, urls: list[str], target: str, api_key: str | None) -> None:
        self.urls, self.target = urls, target
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}

    def read(self) -> tuple[float, float] | None:
        from router.stack import metric_samples

        total, steps, seen = 0.0, 0.0, False
        for url in self.urls:
            try:
                request = urllib.request.Request(url, headers=self.headers)
                text = urllib.request.urlopen(request, timeout=10).read().decode()
            except OSError:
                continue
            sums = metric_samples(text, f"{BATCH_ROWS}_sum", model=self.target)
            counts = metric_samples(text, f"{BATCH_ROWS}_count", model=self.target)
            seen = seen or f"# TYPE {BATCH_ROWS} " in text  # declared, maybe with no step yet
            total, steps = total + sum(sums), steps + sum(counts)
        return (total, steps) if seen else None


def mean_batch_rows(spans: list[tuple[tuple[float, float] | None, tuple[float, float] | None]]) -> float | None:
    """Mean rows per step over (before, after) readings of the histogram's (sum, count)."""
    if any(before is None or after is None for before, after in spans):
        return None
    steps = sum(after[1] - before[1] for before, after in spans)
    return sum(after[0] - before[0] for before, after in spans) / steps if steps else None


@dataclass(slots=True)
class Endpoints:
    http_url: str | None
    grpc_address: str | None
    metrics_urls: list[str]
    config: dict  # the specdec config (tokenizers of known targets)
    log_path: Path | None = None  # the log of the `specdec serve` started here


@contextlib.contextmanager
def endpoints(args: argparse.Namespace) -> Iterator[Endpoints]:
    """The given server, or a `specdec serve` of `--targets` started here and stopped after."""
    from shared.config import default_config

    config = default_config().model_dump(mode="json")
    if args.config is not None:
        import yaml

        config = merge_config(config, yaml.safe_load(args.config.read_text()) or {})
    if args.http_url or args.grpc_address:
        metrics = [f"{args.http_url.rstrip('/')}/metrics"] if args.http_url else []
        yield Endpoints(args.http_url, args.grpc_address, metrics + args.metrics_url, config)
        return
    from router.stack import ServeProcess

    unknown = set(args.targets) - {t["name"] for t in config["targets"]}
    if unknown:
        raise ValueError(f"targets {sorted(unknown)} are not in the config; name its targets or pass --http-url")
    served = dict(config, router_port=0, http_port=0,
                  targets=[t for t in config["targets"] if t["name"] in args.targets])  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="loadtest-") as workdir:
        stack = ServeProcess(Path(workdir), served, ray=args.ray)
        stack.start()
        try:
            children = [f"http://127.0.0.1:{c['metrics_port']}/metrics" for c in stack.state["children"]
                        if c.get("metrics_port")]  # fmt: skip
            yield Endpoints(stack.http_url, stack.grpc_address, children + args.metrics_url, config, stack.log_path)
        finally:
            if stack.stop() != 0:
                print(f"specdec serve exited with {stack.proc.returncode}:\n{stack.log_tail()}")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- run


@dataclass(frozen=True, slots=True)
class Level:
    load: str  # concurrency | rate
    value: float
    num_requests: int
    arrivals_s: tuple[float, ...] = ()  # open loop


def levels(args: argparse.Namespace) -> list[Level]:
    closed = [Level("concurrency", c, args.requests_per_level or max(2 * c, 16)) for c in args.concurrency]
    opened = []
    for rate in args.rates:
        arrivals = poisson_arrivals(rate, args.duration_s, np.random.default_rng(args.seed))
        opened.append(Level("rate", rate, len(arrivals), tuple(arrivals)))
    return closed + opened


def make_client(protocol: str, args: argparse.Namespace, ends: Endpoints) -> HttpLoadClient | GrpcLoadClient:
    shape = RequestShape(args.max_tokens, args.temperature)
    if protocol == "grpc":
        return GrpcLoadClient(ends.grpc_address, shape, args.timeout_s, args.api_key)
    max_connections = args.max_connections or max(args.concurrency + ([1024] if args.rates else []))
    return HttpLoadClient(ends.http_url, shape, max_connections, args.timeout_s, args.connect_timeout_s,
                          args.api_key)


async def run_level(client: HttpLoadClient | GrpcLoadClient, target: str, method: str, level: Level,
                    next_prompt: PromptCycle) -> tuple[list[RequestRecord], float, float]:  # fmt: skip
    """(records, wall s, client CPU s) of one level."""
    from tqdm import tqdm

    wire_method = None if method == DEFAULT_METHOD else method
    send = functools.partial(client.send, target, method=wire_method)
    desc = f"{target} {method} {level.load}={level.value:g}"
    with tqdm(total=level.num_requests, desc=desc, leave=False) as bar:
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        if level.load == "concurrency":
            records = await closed_loop(send, next_prompt, int(level.value), level.num_requests, bar.update)
        else:
            records = await open_loop(send, next_prompt, list(level.arrivals_s), bar.update)
        return records, time.perf_counter() - t0, cpu_seconds() - cpu0


def pass_order(methods: list[str], repeat: int) -> list[str]:
    """The methods' order in pass `repeat` of a level: forward, then backward, and so on, so
    that no method always runs first after a level change (or right after another one)."""
    return list(methods) if repeat % 2 == 0 else list(reversed(methods))


async def run_all(args: argparse.Namespace, ends: Endpoints, prompts: dict[str, list[str]]) -> list[dict]:
    from tqdm import tqdm

    slo, plan, rows = Slo(args.slo_ttft_s, args.slo_tpot_ms / 1e3), levels(args), []
    for protocol in args.protocols:
        client = make_client(protocol, args, ends)
        try:
            for target in args.targets:
                probe = BatchRowsProbe(ends.metrics_urls, target, args.api_key)
                cycles = {method: PromptCycle(prompts[target], args.seed) for method in args.methods}
                # NOTE: every method at one level before the next level, so that a slow spell
                # of a shared machine hits all methods of a level alike, not one method's sweep
                for level in plan:
                    passes: dict[str, list[Pass]] = {method: [] for method in args.methods}
                    for repeat in range(args.repeats):
                        for method in pass_order(args.methods, repeat):
                            before = probe.read()
                            records, wall_s, cpu_s = await run_level(client, target, method, level, cycles[method])
                            passes[method].append(Pass(records, wall_s, cpu_s, before, probe.read()))
                    for method in args.methods:
                        row = {"target": target, "method": method, "protocol": protocol, "load": level.load,
                               "level": level.value, **merged_row(passes[method], slo)}  # fmt: skip
                        rows.append(row)
                        tqdm.write(one_line(row))
        finally:
            await client.close()
    order = {m: i for i, m in enumerate(args.methods)}
    rows.sort(key=lambda r: (args.protocols.index(r["protocol"]), args.targets.index(r["target"]), order[r["method"]]))
    return rows


@dataclass(slots=True)
class Pass:
    """One method's run of one level (one of `--repeats`)."""

    records: list[RequestRecord]
    wall_s: float
    cpu_s: float
    rows_before: tuple[float, float] | None  # the batch-rows histogram around it
    rows_after: tuple[float, float] | None


def aa_ratio(per_pass: list[float]) -> float | None:
    """A method's even passes' mean tok/s over its odd ones' (None below two passes)."""
    return float(np.mean(per_pass[1::2]) / np.mean(per_pass[0::2])) if len(per_pass) > 1 else None


def merged_row(passes: list[Pass], slo: Slo) -> dict:
    """A method's row of one level over all its passes (rates over their summed wall time),
    with each pass's tok/s; two or more passes also give an A/A ratio: the even passes'
    tok/s over the odd ones', the noise floor of comparing one method with another."""
    records = [r for p in passes for r in p.records]
    row = summarize(records, sum(p.wall_s for p in passes), sum(p.cpu_s for p in passes), slo)
    per_pass = [summarize(p.records, p.wall_s, p.cpu_s, slo)["output_tokens_per_s"] for p in passes]
    row["pass_tokens_per_s"] = per_pass
    row["aa_ratio"] = aa_ratio(per_pass)
    row["mean_batch_rows"] = mean_batch_rows([(p.rows_before, p.rows_after) for p in passes])
    return row


# ---------------------------------------------------------------- report


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1e3:.0f}"


def _load(row: dict) -> str:
    return f"c={row['level']:g}" if row["load"] == "concurrency" else f"{row['level']:g} req/s"


def one_line(r: dict) -> str:
    return (f"{r['target']} {r['method']} {r['protocol']} {_load(r)}: {r['completed']}/{r['requests']} ok, "
            f"{r['rejected']} rejected, {r['failed']} failed, {r['requests_per_s']:.2f} req/s, "
            f"{r['output_tokens_per_s']:.0f} tok/s, TTFT p50 {_ms(r['ttft_s']['p50'])} ms, "
            f"TPOT p50 {_ms(r['tpot_s']['p50'])} ms")  # fmt: skip


def _dist(d: dict) -> str:
    return "/".join(_ms(d[k]) for k in ("mean", "p50", "p90", "p99"))


def to_markdown(rows: list[dict], args: argparse.Namespace, env: dict) -> str:
    lines = [
        f"# Load test ({env['time']}, {args.dataset}, max_tokens {args.max_tokens}, T = {args.temperature:g})\n",
        (f"Goodput: requests/s with TTFT <= {args.slo_ttft_s:g} s and TPOT <= {args.slo_tpot_ms:g} ms. "
        "Latencies in ms as mean/p50/p90/p99. ITL is per received chunk: a speculative chunk carries "
        "several tokens, so it is not per token. TPOT = (e2e - TTFT) / (tokens - 1). tau: mean "
        "acceptance length over the requests that report it; drafted: share of target steps that "
        "verified a draft. Batch rows: mean rows per verifier step "
        f"(`{BATCH_ROWS}`), n/a where no scraped /metrics has it. Client CPU: the load tool's own "
         "user + system time over wall time.\n"),
        ("| target | method | protocol | load | ok | rejected | failed | req/s | out tok/s | goodput req/s "
         "| TTFT | TPOT | ITL | e2e | tau | drafted | batch rows | client CPU |"),
        "|---" * 18 + "|",
    ]
    for r in rows:
        tau = "n/a" if r["tau"] is None else f"{r['tau']:.2f}"
        drafted = "n/a" if r["drafted_share"] is None else f"{r['drafted_share']:.0%}"
        batch = "n/a" if r["mean_batch_rows"] is None else f"{r['mean_batch_rows']:.1f}"
        lines.append(
            f"| {r['target']} | {r['method']} | {r['protocol']} | {_load(r)} | {r['completed']}/{r['requests']} "
            f"| {r['rejected']} | {r['failed']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.0f} "
            f"| {r['goodput_requests_per_s']:.2f} | {_dist(r['ttft_s'])} | {_dist(r['tpot_s'])} "
            f"| {_dist(r['itl_s'])} | {_dist(r['e2e_s'])} | {tau} | {drafted} | {batch} | {r['client_cpu_share']:.0%} |"
        )  # fmt: skip
    lines += ratio_table(rows)
    if any("chunks" in r["token_sources"] for r in rows):
        lines.append("\nSome servers reported neither usage nor token ids: their tokens are counted one per "
                     "chunk, a lower bound (tok/s and TPOT too low).")  # fmt: skip
    errors = [f"- {r['target']} {r['method']} {r['protocol']} {_load(r)}: `{e}`" for r in rows for e in r["errors"]]
    if errors:
        lines += ["\nFirst errors per level:\n", *errors]
    return "\n".join(lines) + "\n"


def paired_ratios(row: dict, base: dict) -> list[float]:
    """Pass i of `row`'s method over pass i of `base`'s (they ran in the same round of
    alternating order, next to each other); nothing unless both ran the same passes."""
    mine, theirs = row.get("pass_tokens_per_s") or [], base.get("pass_tokens_per_s") or []
    if len(mine) != len(theirs) or not all(theirs):
        return []
    return [a / b for a, b in zip(mine, theirs)]


def ratio_table(rows: list[dict], base: str = "none") -> list[str]:
    """Each method's output tok/s over `base`'s at the same target, protocol and level (the
    issue's goal: speculation >= 0.97 x none at every load), with `base`'s A/A ratio when the
    levels ran more than once; nothing without a `base` row. With two or more passes a cell
    also gives the standard error of the per-pass ratios (`paired_ratios`): a pass of one
    method against one of another moves by several per cent on a shared machine."""
    bases = {(r["target"], r["protocol"], r["load"], r["level"]): r for r in rows if r["method"] == base}
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != base))
    if not bases or not methods:
        return []
    has_aa = any(b["aa_ratio"] is not None for b in bases.values())
    head = ["target", "protocol", "load", f"{base} tok/s", *(f"{m} / {base}" for m in methods)]
    head += [f"{base} A/A"] if has_aa else []
    out = [f"\nOutput tok/s over `{base}`'s at the same level (± the standard error of the per-pass ratios):\n",
           "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]  # fmt: skip
    by = {(r["target"], r["protocol"], r["load"], r["level"], r["method"]): r for r in rows}
    for key, b in bases.items():
        cells = [key[0], key[1], _load(b), f"{b['output_tokens_per_s']:.0f}"]
        for m in methods:
            r = by.get((*key, m))
            if r is None or not b["output_tokens_per_s"]:
                cells.append("n/a")
                continue
            cell = f"{r['output_tokens_per_s'] / b['output_tokens_per_s']:.2f}"
            if len(pairs := paired_ratios(r, b)) > 1:
                cell += f" ± {np.std(pairs, ddof=1) / np.sqrt(len(pairs)):.2f}"
            cells.append(cell)
        if has_aa:
            cells.append("n/a" if b["aa_ratio"] is None else f"{b['aa_ratio']:.2f}")
        out.append("| " + " | ".join(cells) + " |")
    return out


def pooled_rows(runs: list[list[dict]]) -> list[dict]:
    """Rows of several runs of the same levels as if they were one run's passes: wall time
    and tokens summed, passes concatenated in run order (a run's rounds alternate the order
    of its methods, so each run should have an even number of passes for the A/A ratio)."""
    pooled: dict[tuple, dict] = {}
    for rows in runs:
        for r in rows:
            key = (r["target"], r["protocol"], r["load"], r["level"], r["method"])
            p = pooled.setdefault(key, {**dict(zip(("target", "protocol", "load", "level", "method"), key)),
                                        "wall_s": 0.0, "tokens": 0.0, "pass_tokens_per_s": []})  # fmt: skip
            p["wall_s"] += r["wall_s"]
            p["tokens"] += r["output_tokens_per_s"] * r["wall_s"]
            p["pass_tokens_per_s"].extend(r.get("pass_tokens_per_s") or ())
    for p in pooled.values():
        p["output_tokens_per_s"] = p.pop("tokens") / p["wall_s"]
        p["aa_ratio"] = aa_ratio(p["pass_tokens_per_s"])
    return list(pooled.values())


def plot(rows: list[dict], path: Path) -> None:
    """Per load kind: output tok/s, TTFT and ITL p50/p99 against load, a line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("concurrency", "rate") if any(r["load"] == k for r in rows)]
    fig, axes = plt.subplots(len(kinds), 3, figsize=(16, 4.5 * len(kinds)), squeeze=False)
    for ax_row, kind in zip(axes, kinds):
        mine = [r for r in rows if r["load"] == kind]
        for series in dict.fromkeys((r["target"], r["method"], r["protocol"]) for r in mine):
            rs = [r for r in mine if (r["target"], r["method"], r["protocol"]) == series]
            x, label = [r["level"] for r in rs], " ".join(series)
            (line,) = ax_row[0].plot(x, [r["output_tokens_per_s"] for r in rs], marker="o", label=label)
            for ax, key in ((ax_row[1], "ttft_s"), (ax_row[2], "itl_s")):
                for pct, style in (("p50", "-"), ("p99", "--")):
                    ys = [np.nan if r[key][pct] is None else r[key][pct] * 1e3 for r in rs]
                    ax.plot(x, ys, style, marker="o", color=line.get_color(), label=f"{label} {pct}")
        xlabel = "concurrent requests" if kind == "concurrency" else "offered rate (req/s)"
        titles = ("output tokens/s", "TTFT (ms; p50 solid, p99 dashed)", "ITL per chunk (ms; p50 solid, p99 dashed)")
        for ax, title in zip(ax_row, titles):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel(xlabel)
            ax.set_title(title)
        ax_row[0].legend(fontsize=7)
        ax_row[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out_dir: Path, payload: dict, markdown: str) -> Path:
    """loadtest-<time>.{json,md,png} in `out_dir`; returns the path without suffix."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"loadtest-{time.strftime('%Y%m%d-%H%M%S')}"
    base.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    base.with_suffix(".md").write_text(markdown)
    plot(payload["rows"], base.with_suffix(".png"))
    return base


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from router.client import default_api_key

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--http-url", help="a running server's base URL (default: start specdec serve)")
    p.add_argument("--grpc-address", help="a running specdec router's gRPC address")
    p.add_argument("--protocols", "--protocol", nargs="+", choices=["http", "grpc"], default=["http"])
    p.add_argument("--config", type=Path, help="YAML merged over the default config (for the server started here)")
    p.add_argument("--ray", action="store_true", help="start the server as `specdec serve --ray` (Ray Serve)")
    p.add_argument("--metrics-url", nargs="*", default=[], help="more /metrics URLs to scrape for batch rows")
    p.add_argument("--targets", nargs="+", default=["codelm-target-m", "codelm-target-s"])
    p.add_argument("--methods", nargs="+", default=["none"],
                   help=f"specdec methods; '{DEFAULT_METHOD}' sends no method field (any OpenAI server)")
    p.add_argument("--concurrency", nargs="*", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--requests-per-level", type=int, help="closed loop; default max(2 x concurrency, 16)")
    p.add_argument("--repeats", type=int, default=1,
                   help="passes over each level's methods (order alternating), summed per method; "
                        ">= 2 also reports an A/A ratio per row (the noise floor)")
    p.add_argument("--rates", nargs="*", type=float, default=[], help="open-loop Poisson arrival rates (req/s)")
    p.add_argument("--duration-s", type=float, default=30.0, help="of each open-loop rate")
    p.add_argument("--dataset", choices=["humaneval", "mt_bench", "spec_bench"], default="humaneval")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-prompt-tokens", type=int, help=f"default {DEMO_WINDOW} - max_tokens")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory for targets not in the config")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (e.g. 0.8 for sampled runs)")
    p.add_argument("--slo-ttft-s", type=float, default=1.0)
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--timeout-s", type=float, default=600.0, help="gRPC deadline; HTTP read/write/pool timeout")
    p.add_argument("--connect-timeout-s", type=float, default=10.0)
    p.add_argument("--max-connections", type=int,
                   help="HTTP pool size (default: the highest concurrency, 1024 with --rates)")
    p.add_argument("--api-key", default=default_api_key(), help="Bearer key (default: SPECDEC_API_KEY's first)")
    p.add_argument("--seed", type=int, default=0,
                   help="of the Poisson arrivals, and the first sampled request's (then +1 per request)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--pool", nargs="+", type=Path, metavar="RUN_JSON",
                   help="run nothing: print the ratio table of earlier runs' JSON results pooled (their passes together)")
    args = p.parse_args(argv)
    if args.pool:
        return args
    if not args.concurrency and not args.rates:
        p.error("nothing to run: give --concurrency levels or --rates")
    if args.http_url or args.grpc_address:
        missing = [x for x in args.protocols if not (args.http_url if x == "http" else args.grpc_address)]
        if missing:
            p.error(f"--protocols {' '.join(missing)} needs its address (--http-url / --grpc-address)")
    return args


def prompts_per_target(args: argparse.Namespace, config: dict) -> dict[str, list[str]]:
    model_dirs = {t["name"]: Path(t["model_dir"]) for t in config["targets"]}
    budget = args.max_prompt_tokens or DEMO_WINDOW - args.max_tokens
    raw = load_prompts(args.dataset)
    return {t: fitting_prompts(raw, token_counter(model_dirs.get(t, args.tokenizer)), budget) for t in args.targets}


def main(argv: list[str] | None = None) -> Path | None:
    args = parse_args(argv)
    if args.pool:
        runs = [json.loads(path.read_text())["rows"] for path in args.pool]
        print(f"Pooled: {', '.join(path.name for path in args.pool)}")
        print("\n".join(ratio_table(pooled_rows(runs))))
        return None
    with endpoints(args) as ends:
        prompts = prompts_per_target(args, ends.config)
        rows = asyncio.run(run_all(args, ends, prompts))
        # a failed request's cause is often only in the server's log, gone with its workdir
        failed = any(row["failed"] for row in rows)
        serve_log = ends.log_path.read_text(errors="replace") if failed and ends.log_path else None
    env = environment()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "api_key"}
    payload = {"env": env, "args": settings, "num_prompts": {t: len(p) for t, p in prompts.items()}, "rows": rows}
    markdown = to_markdown(rows, args, env)
    base = write_report(args.out_dir, payload, markdown)
    print(markdown)
    print(f"results: {base}.{{json,md,png}}")
    if serve_log is not None:
        Path(f"{base}.serve.log").write_text(serve_log)
        print(f"requests failed: the server's log is in {base}.serve.log")
    return base


def _exit_on_sigterm() -> None:
    """SIGTERM (a job runner, `kill`) ends the run like Ctrl-C: the `specdec serve` started
    here is stopped on the way out instead of outliving the tool."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


if __name__ == "__main__":
    _exit_on_sigterm()
    main()
