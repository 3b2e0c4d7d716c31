"""Step cost of the batched target engine: seconds per step against rows x tokens per row,
and the throughput ceiling it predicts for plain decoding (prefill included).

    python -m bench.step_cost                                  # both demo targets
    python -m bench.step_cost --targets codelm-target-s --rows 1 8 32

Each row holds `--context` cached tokens (a prompt) and feeds t tokens per step (t = 1:
plain decoding; t = k + 1: a verify of k drafts). The ceiling for `none` at R rows with
prompts of P tokens and N new tokens each: R requests finish every N decode steps plus
their prefill, R·N / (N·step(R, 1) + R·P / prefill tokens per second).
Results: bench/results/step-cost-<time>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import environment, write_results
from shared.config import default_config
from shared.llama import RowFeed
from shared.loading import set_num_threads


def step_seconds(engine, rows: int, tokens: int, context: int, repeats: int) -> float:
    """Median seconds of one step feeding `tokens` to each of `rows` rows."""
    slots = [engine.allocate() for _ in range(rows)]
    try:
        engine.step([RowFeed(s, list(range(5, 5 + context)), 0) for s in slots])  # the prompts
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.step([RowFeed(s, [7] * tokens, tokens) for s in slots])
            times.append(time.perf_counter() - t0)
            for s in slots:
                engine.rollback(s, context)
        return statistics.median(times)
    finally:
        for s in slots:
            engine.release(s)


def prefill_tokens_per_s(engine, chunk: int, repeats: int) -> float:
    slot = engine.allocate()
    try:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.step([RowFeed(slot, list(range(5, 5 + chunk)), 1)])
            times.append(time.perf_counter() - t0)
            engine.rollback(slot, 0)
        return chunk / statistics.median(times)
    finally:
        engine.release(slot)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["codelm-target-m", "codelm-target-s"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 4, 6])
    parser.add_argument("--context", type=int, default=128, help="cached tokens per row")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="P of the ceiling")
    parser.add_argument("--new-tokens", type=int, default=128, help="N of the ceiling")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_num_threads(args.threads)
    from verifier_service.engine import load_target

    config = default_config()
    results = {}
    md = [f"# Batched engine step cost ({environment()['time']}, {args.threads} thread, context {args.context})\n"]
    for target in args.targets:
        engine, _ = load_target(config.target(target), max_batch_rows=max(args.rows))
        with torch.inference_mode():
            grid = {(r, t): step_seconds(engine, r, t, args.context, args.repeats)
                    for r in args.rows for t in args.tokens}  # fmt: skip
            prefill = prefill_tokens_per_s(engine, 256, args.repeats)
        n, p = args.new_tokens, args.prompt_tokens
        ceiling = {r: r * n / (n * grid[(r, 1)] + r * p / prefill) for r in args.rows}
        results[target] = {"step_ms": {f"{r}x{t}": s * 1e3 for (r, t), s in grid.items()},
                           "prefill_tokens_per_s": prefill, "none_ceiling_tokens_per_s": ceiling}  # fmt: skip
        md += [f"\n## {target}\n", "step ms (rows x tokens per row)\n",
               "| rows | " + " | ".join(f"t={t}" for t in args.tokens) + " | decode tok/s (t=1) | ceiling tok/s (prefill incl.) |",
               "|---" * (len(args.tokens) + 3) + "|"]  # fmt: skip
        for r in args.rows:
            cells = " | ".join(f"{grid[(r, t)] * 1e3:.2f}" for t in args.tokens)
            md.append(f"| {r} | {cells} | {r / grid[(r, 1)]:.0f} | {ceiling[r]:.0f} |")
        md.append(f"\nprefill: {prefill:.0f} tokens/s (one 256-token chunk)")
    markdown = "\n".join(md) + "\n"
    base = write_results("step-cost", {"env": environment(), "args": vars(args), "results": results}, markdown)
    print(markdown)
    print(f"results: {base}.{{json,md}}")


if __name__ == "__main__":
    main()
