"""The repeated-prompt draft cache against plain `ngram` (in process, greedy;
`python -m bench.draft_cache`).

The "repeated" scenario: each prompt is served twice, the second time by the other
replica. Replica A serves it with `ngram` and stores its output in the cache (what the
verifier does when a greedy request finishes); replica B then serves the same prompt
twice, with the cache in front of `ngram` (on) and without it (off), prompt by prompt
interleaved. "Replicas" are two views of the store: on `memory` one process's store (as
two requests of one verifier), on `redis` two connections to one Redis (as two
verifiers). The shared n-gram table is left out: the rows measure the draft cache alone.

Per target and store: tokens per target forward over all rounds (prefill included), τ,
tok/s, each on / off, and the cache's lookups (hit / miss) and tokens drafted / accepted.
Store calls awaited inside a round: 0 by construction (`CachedContinuation` polls
`done()` and never calls `result()` on an unfinished fetch).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from bench.common import Totals, environment, humaneval_prompts_that_fit, write_results
from bench.shared_ngram import _run
from router.serve import local_redis_server
from shared import metrics
from shared.config import default_config
from shared.draft_cache import CachedProposerFactory, DraftCache
from shared.ngram import NgramProposerFactory
from shared.store import MemoryStore, RedisStore, StoreRunner
from shared.types import SamplingParams
from verifier_service.engine import load_target
from verifier_service.loop import SpecDecodeLoop
from verifier_service.policy import RulePolicy


def _runners(store_kind: str, redis_url: str | None) -> tuple[StoreRunner, StoreRunner]:
    if store_kind == "memory":
        runner = StoreRunner(MemoryStore())
        return runner, runner
    return StoreRunner(RedisStore(redis_url)), StoreRunner(RedisStore(redis_url))


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    config = default_config()
    speculation = config.speculation.model_copy(update={"load_aware": False})  # the rule's fixed k
    cache_config = config.store.draft_cache.model_copy(update={"enabled": True})
    results: dict = {}
    with contextlib.ExitStack() as cleanup:
        redis_url = args.redis_url
        if "redis" in args.stores and not redis_url:
            redis_url = cleanup.enter_context(local_redis_server())  # what `specdec serve --redis` starts
        for target in args.targets:
            engine, tokenizer = load_target(config.target(target), max_batch_rows=1)
            loop = SpecDecodeLoop(engine, tokenizer, RulePolicy(speculation))
            prompts = humaneval_prompts_that_fit(tokenizer, args.num_prompts, args.max_new_tokens)
            plain = NgramProposerFactory(config.ngram)
            sampling = SamplingParams()
            for store_kind in args.stores:
                key = f"{target} {store_kind}"
                runner_a, runner_b = _runners(store_kind, redis_url)
                namespace = f"{target}#bench-{time.time_ns()}"  # a fresh cache
                writer = DraftCache(runner_a, cache_config, namespace, engine.vocab_size)
                cached = CachedProposerFactory(plain, DraftCache(runner_b, cache_config, namespace, engine.vocab_size))
                lookups0 = _counts(namespace)
                differ = 0  # B's outputs (on and off) unlike A's
                totals = {name: Totals() for name in ("off", "on")}
                for prompt in prompts:
                    first, _, _ = _run(loop, plain, prompt, sampling, args.max_new_tokens)  # replica A
                    written = writer.record(prompt, first.token_ids, greedy=True)
                    if written is not None:
                        written.result(30)  # A's write is in the store before B starts
                    for name, factory in (("off", plain), ("on", cached)):  # replica B
                        result, dt, _ = _run(loop, factory, prompt, sampling, args.max_new_tokens)
                        # only a floating-point tie under another step shape may explain a difference
                        differ += result.token_ids != first.token_ids
                        totals[name].add(result, dt)
                for runner in {runner_a, runner_b}:
                    runner.close()
                rows: dict = {name: t.summary() for name, t in totals.items()}
                now = _counts(namespace)
                rows["cache"] = {r: now[r] - lookups0[r] for r in now}
                rows["outputs_unlike_replica_a"] = differ
                results[key] = rows
                on, off = rows["on"], rows["off"]
                print(f"[{key}] tokens/forward {on['tokens_per_forward']:.2f} / {off['tokens_per_forward']:.2f} "
                      f"τ {on['tau']:.2f} / {off['tau']:.2f} tok/s {on['tok_s'] / off['tok_s']:.3f}x "
                      f"cache {rows['cache']} outputs unlike A {differ}", flush=True)  # fmt: skip
    return results


COUNTS = ("hit", "miss", "bad", "failed", "divergent")


def _counts(model: str) -> dict[str, float]:
    out = {r: metrics.DRAFT_CACHE_LOOKUPS.labels(model, r)._value.get() for r in COUNTS}
    for outcome in ("drafted", "accepted"):
        out[f"tokens_{outcome}"] = metrics.DRAFT_CACHE_TOKENS.labels(model, outcome)._value.get()
    return out


def to_markdown(results: dict, args) -> str:
    out = [(f"# Draft cache on vs off, repeated prompts ({args.num_prompts} HumanEval prompts, each served "
            f"by replica A then by replica B; greedy, max_new_tokens {args.max_new_tokens}, method ngram)\n"),
           "| target | store | tokens/forward (on / off) | τ (on / off) | tok/s (on / off) | lookups hit/miss/bad/failed, divergent | cache tokens drafted/accepted |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, rows in results.items():
        target, store = key.split(" ")
        on, off, c = rows["on"], rows["off"], rows["cache"]
        out.append(f"| {target} | {store} | {on['tokens_per_forward']:.2f} / {off['tokens_per_forward']:.2f} "
                   f"({on['tokens_per_forward'] / off['tokens_per_forward']:.2f}×) | {on['tau']:.2f} / {off['tau']:.2f} | "
                   f"{on['tok_s']:.0f} / {off['tok_s']:.0f} ({on['tok_s'] / off['tok_s']:.2f}×) | "
                   f"{'/'.join(str(int(c[x])) for x in COUNTS[:4])}, {int(c['divergent'])} | "
                   f"{int(c['tokens_drafted'])}/{int(c['tokens_accepted'])} |")  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", nargs="+", default=["codelm-target-m"])
    p.add_argument("--stores", nargs="+", default=["memory"], choices=["memory", "redis"])
    p.add_argument("--redis-url", default=None, help="default: start a local redis-server")
    p.add_argument("--num-prompts", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    results = run(args)
    markdown = to_markdown(results, args)
    base = write_results("draft-cache", {"env": environment(), "args": vars(args), "results": results}, markdown)
    print(markdown)
    print(f"results: {base}.{{json,md}}")


if __name__ == "__main__":
    main()
