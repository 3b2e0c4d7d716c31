"""The shared n-gram table against request-only `ngram` (in process, one replica learns,
another measures; `python -m bench.shared_ngram`).

Scenarios, each with a fresh table namespace:

- cross-prompt: the table learns from the outputs of one half of HumanEval (even
  prompts); `ngram` is measured on the other half (odd prompts), read-only, so no
  measured prompt ever sees its own output;
- cross-domain: the table learns from MT-Bench (English, out of the models' domain);
  measured on the same odd HumanEval half: the contamination guard must keep τ at or
  above request-only `ngram`;
- repeated: the table learns from the measured prompts themselves (a replay: it inflates
  τ, reported separately, llama.cpp #26100).

Per scenario and mode (greedy, T = 0.8 seeded): tokens per target forward over all rounds
(prefill included), τ, tok/s, each as shared / request-only in the same run (prompt by
prompt interleaved), the table's hits, and for Redis its memory per 1k learned requests.
Store calls awaited inside a round: 0 by construction (reads are futures polled with
`done()`; `SharedDrafts` never calls `result()` on an unfinished one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import numpy as np
import torch

from bench.common import Totals, environment, humaneval_prompts_that_fit, write_results
from router.serve import local_redis_server
from shared.config import default_config
from shared.loading import tokenizer_hash
from shared.ngram import NgramProposerFactory
from shared.ngram_table import SharedNgramTable
from shared.paths import data_dir
from shared.store import MemoryStore, RedisStore, StoreRunner
from shared.types import GenerationRequest, SamplingParams
from verifier_service.engine import load_target
from verifier_service.loop import SpecDecodeLoop
from verifier_service.policy import RulePolicy


def mt_bench_prompts(tokenizer, n: int, max_new: int) -> list[list[int]]:
    out = []
    with open(data_dir() / "mt_bench" / "question.jsonl") as f:
        for line in f:
            ids = tokenizer(json.loads(line)["turns"][0]).input_ids
            if len(ids) + max_new <= 256:
                out.append(ids)
            if len(out) == n:
                break
    return out


def _redis_memory(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def _timed_steps(loop: SpecDecodeLoop) -> list[float]:
    """Record the seconds of every step (round) the loop runs from now on."""
    times: list[float] = []
    step = loop.step

    def timed() -> None:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)

    loop.step = timed
    return times


def _run(loop: SpecDecodeLoop, factory, prompt: list[int], sampling: SamplingParams, max_new: int):
    request = GenerationRequest(prompt_ids=prompt, max_new_tokens=max_new, method="ngram", sampling=sampling)
    proposer = factory.new_session(prompt, sampling) if factory is not None else None
    t0 = time.perf_counter()
    (result,) = loop.run_together([(request, proposer)])
    return result, time.perf_counter() - t0, proposer


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    config = default_config()
    speculation = config.speculation.model_copy(update={"load_aware": False})  # the rule's fixed k
    results: dict = {}
    with contextlib.ExitStack() as cleanup:
        redis_url = args.redis_url
        if "redis" in args.stores and not redis_url:
            redis_url = cleanup.enter_context(local_redis_server())  # what `specdec serve --redis` starts
        for target in args.targets:
            engine, tokenizer = load_target(config.target(target), max_batch_rows=1)
            loop = SpecDecodeLoop(engine, tokenizer, RulePolicy(speculation))
            step_times = _timed_steps(loop)
            tok_hash = tokenizer_hash(config.target(target).model_dir)
            prompts = humaneval_prompts_that_fit(tokenizer, 2 * args.num_prompts, args.max_new_tokens)
            learn_half, measure = prompts[0::2], prompts[1::2]
            scenarios = {"cross-prompt": learn_half, "cross-domain": mt_bench_prompts(tokenizer, args.num_prompts, args.max_new_tokens),
                         "repeated": measure}  # fmt: skip
            plain = NgramProposerFactory(config.ngram)
            for store_kind in args.stores:
                for mode in args.modes:
                    for scenario, learn_prompts in scenarios.items():
                        key = f"{target} {store_kind} {mode} {scenario}"
                        store = MemoryStore() if store_kind == "memory" else RedisStore(redis_url)
                        runner = StoreRunner(store)
                        namespace = f"{target}#{scenario}-{mode}-{time.time_ns()}"  # a fresh table
                        cfg = config.store.shared_ngram
                        writer = SharedNgramTable(runner, cfg, tok_hash, namespace, engine.vocab_size)
                        reader = SharedNgramTable(runner, cfg, tok_hash, namespace, engine.vocab_size, learn=False)
                        mem0 = _redis_memory(redis_url) if store_kind == "redis" else 0
                        for i, prompt in enumerate(learn_prompts):
                            sampling = SamplingParams(temperature=args.temperature, seed=10_000 + i) if mode == "sample" else SamplingParams()
                            result, _, _ = _run(loop, plain, prompt, sampling, args.max_new_tokens)
                            writer.learn(prompt, result.token_ids)  # as the servicer does with every result
                        runner.submit(_noop).result(30)
                        time.sleep(0.2)
                        mem = (_redis_memory(redis_url) - mem0) * 1000 / len(learn_prompts) if store_kind == "redis" else None
                        shared_factory = NgramProposerFactory(config.ngram, reader)
                        fetches0 = _fetch_counts(namespace)
                        names = ("request-only", "shared")
                        totals = {name: Totals() for name in names}
                        hits = dict.fromkeys(names, 0)
                        round_s: dict[str, list[float]] = {name: [] for name in names}
                        for i, prompt in enumerate(measure):
                            sampling = SamplingParams(temperature=args.temperature, seed=i) if mode == "sample" else SamplingParams()
                            for name, factory in (("request-only", plain), ("shared", shared_factory)):
                                step_times.clear()
                                result, dt, proposer = _run(loop, factory, prompt, sampling, args.max_new_tokens)
                                totals[name].add(result, dt)
                                round_s[name] += step_times[1:]  # the rounds after the prefill step
                                hits[name] += proposer.shared.num_hits if proposer.shared else 0
                        runner.close()
                        rows = {}
                        for name, t in totals.items():
                            rows[name] = {
                                **t.summary(), "table_hits": hits[name],
                                "round_ms_p50_p90_p99": [float(x) * 1e3 for x in np.percentile(round_s[name], [50, 90, 99])],
                            }  # fmt: skip
                        rows["redis_bytes_per_1k_requests"] = mem
                        now = _fetch_counts(namespace)
                        rows["fetches"] = {r: now[r] - fetches0[r] for r in now}
                        results[key] = rows
                        s, r = rows["shared"], rows["request-only"]
                        print(f"[{key}] tokens/forward {s['tokens_per_forward'] / r['tokens_per_forward']:.3f}x "
                              f"tok/s {s['tok_s'] / r['tok_s']:.3f}x hits {s['table_hits']}", flush=True)  # fmt: skip
    return results


FETCH_RESULTS = ("hit", "stale", "empty", "late", "guarded", "failed", "local")


def _fetch_counts(model: str) -> dict[str, float]:
    from shared import metrics

    return {r: metrics.SHARED_NGRAM_FETCHES.labels(model, r)._value.get() for r in FETCH_RESULTS}


async def _noop() -> None:
    return None


def to_markdown(results: dict, args) -> str:
    out = [f"# Shared n-gram table vs request-only ngram ({args.num_prompts} measured HumanEval prompts, "
           f"max_new_tokens {args.max_new_tokens}, T = {args.temperature} for sample rows)\n",
           "| target | store | mode | scenario | tokens/forward (shared / request-only) | τ | tok/s (ratio) | round ms p50/p90/p99 (shared; request-only) | table fetches hit/stale/empty/late/guarded/failed/local | Redis bytes per 1k learned requests |",
           "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, rows in results.items():
        target, store, mode, scenario = key.split(" ")
        s, r = rows["shared"], rows["request-only"]
        mem = rows["redis_bytes_per_1k_requests"]
        out.append(f"| {target} | {store} | {mode} | {scenario} | {s['tokens_per_forward']:.2f} / {r['tokens_per_forward']:.2f} "
                   f"({s['tokens_per_forward'] / r['tokens_per_forward']:.3f}×) | {s['tau']:.2f} / {r['tau']:.2f} | "
                   f"{s['tok_s']:.0f} / {r['tok_s']:.0f} ({s['tok_s'] / r['tok_s']:.3f}×) | "
                   f"{'/'.join(f'{x:.1f}' for x in s['round_ms_p50_p90_p99'])}; "
                   f"{'/'.join(f'{x:.1f}' for x in r['round_ms_p50_p90_p99'])} | "
                   f"{'/'.join(str(int(rows['fetches'][x])) for x in FETCH_RESULTS)} | "
                   f"{'' if mem is None else f'{mem / 1e6:.1f} MB'} |")  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", nargs="+", default=["codelm-target-m", "codelm-target-s"])
    p.add_argument("--stores", nargs="+", default=["memory"], choices=["memory", "redis"])
    p.add_argument("--redis-url", default=None, help="default: start a local redis-server")
    p.add_argument("--modes", nargs="+", default=["greedy", "sample"], choices=["greedy", "sample"])
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    results = run(args)
    markdown = to_markdown(results, args)
    base = write_results("shared-ngram", {"env": environment(), "args": vars(args), "results": results}, markdown)
    print(markdown)
    print(f"results: {base}.{{json,md}}")


if __name__ == "__main__":
    main()
