"""Speedup benchmark: specdec's loop against Hugging Face, in process, one torch thread.

    python -m bench.speedup                      # both targets, greedy and T=0.8 sampling
    python -m bench.speedup --num-prompts 10 --targets codelm-target-m --modes greedy
    python -m bench.speedup --e2e                # + end to end through `specdec serve` (gRPC)

Runs are interleaved prompt by prompt (every variant on prompt 0, then prompt 1, ...) so
machine drift hits all variants alike. Each method family gets the same tuning effort
(three variants); the best variant by tokens/s represents the family. `hf_greedy_aa`
repeats HF greedy: its ratio to `hf_greedy` is the noise floor of the run.

Projected GPU speedup (DESIGN.md, Cost model): tau / (1 + k_mean * c + r) with a verify
forward ~ one step, c = 0.05 (draft/target cost) and r = 0 (no round trip).
Results: bench/results/speedup-<time>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.common import environment, humaneval_prompts_that_fit, repetition_rate, write_results
from shared.config import SpeculationConfig, default_config
from shared.loading import set_num_threads
from shared.sampling import SamplingParams
from shared.types import GenerationRequest

GPU_DRAFT_COST_RATIO = 0.05
GPU_ROUND_TRIP_RATIO = 0.0
OUR_FAMILIES = ("none", "ngram", "draft_model", "sorted", "card")


@dataclass
class Variant:
    family: str  # hf_greedy, hf_assisted, hf_prompt_lookup, none, ngram, draft_model, ...
    label: str  # family + tuning parameter
    run: Callable[[list[int], int], tuple[list[int], dict | None]]  # (prompt, seed) -> (tokens, stats)
    ours: bool = False


@dataclass
class Totals:
    tokens: int = 0
    time_s: float = 0.0
    identical: int = 0
    runs: int = 0
    repetition: float = 0.0
    rounds: int = 0
    spec_rounds: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    target_time_s: float = 0.0
    draft_time_s: float = 0.0
    per_prompt_tps: list[float] = field(default_factory=list)


def hf_variants(model, draft_model, sampling: SamplingParams, max_new_tokens: int) -> list[Variant]:
    def make(family: str, label: str, **kwargs) -> Variant:
        def run(prompt: list[int], seed: int) -> tuple[list[int], None]:
            gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=not sampling.greedy, **kwargs)
            if not sampling.greedy:
                torch.manual_seed(seed)
                gen_kwargs.update(temperature=sampling.temperature, top_k=0, top_p=1.0)
            out = model.generate(torch.tensor([prompt]), **gen_kwargs)
            return out[0, len(prompt) :].tolist(), None

        return Variant(family, label, run)

    variants = [make("hf_greedy" if sampling.greedy else "hf_sample", "hf"),
                make("hf_aa", "hf (A/A)")]
    for n in (3, 5, 8):
        variants.append(make("hf_assisted", f"hf_assisted n={n}", assistant_model=draft_model,
                             num_assistant_tokens=n, num_assistant_tokens_schedule="heuristic"))
    for n in (3, 5, 10):
        variants.append(make("hf_prompt_lookup", f"hf_prompt_lookup n={n}", prompt_lookup_num_tokens=n))
    return variants


def our_variants(loop, factories: dict, sampling: SamplingParams, max_new_tokens: int) -> list[Variant]:
    def make(family: str, label: str, k: int | None) -> Variant:
        factory = factories.get(family)

        def run(prompt: list[int], seed: int) -> tuple[list[int], dict]:
            params = SamplingParams(sampling.temperature, seed=None if sampling.greedy else seed)
            request = GenerationRequest(prompt_ids=prompt, max_new_tokens=max_new_tokens,
                                        sampling=params, method=family, num_speculative_tokens=k)
            proposer = factory.new_session(prompt, params) if factory else None
            *_, result = loop.generate(request, proposer)
            return result.token_ids, result.stats.to_dict()

        return Variant(family, label, run, ours=True)

    variants = [make("none", "ours none", None)]
    for family in factories:
        variants += [make(family, f"ours {family} adaptive", None),
                     make(family, f"ours {family} k=3", 3), make(family, f"ours {family} k=5", 5)]
    return variants


def run_target(target_name: str, args, mode: str) -> dict:
    from drafter_service.draft_model import DraftModelProposerFactory
    from shared.ngram import NgramProposerFactory
    from verifier_service.engine import load_target
    from verifier_service.loop import SpecDecodeLoop

    config = default_config()
    engine, tokenizer = load_target(config.target(target_name))
    loop = SpecDecodeLoop(engine, tokenizer, SpeculationConfig())
    draft_factory = DraftModelProposerFactory(config.drafters[0])
    factories = {"ngram": NgramProposerFactory(config.ngram), "draft_model": draft_factory}
    factories.update(extra_factories(config, args))
    sampling = SamplingParams() if mode == "greedy" else SamplingParams(temperature=args.temperature)
    variants = hf_variants(engine.model, draft_factory.model, sampling, args.max_new_tokens)
    variants += our_variants(loop, factories, sampling, args.max_new_tokens)
    if args.methods:
        keep = {*args.methods, "none"}
        variants = [v for v in variants if v.family in keep or v.family.startswith("hf")]
    prompts = humaneval_prompts_that_fit(tokenizer, args.num_prompts, args.max_new_tokens)

    totals: dict[str, Totals] = defaultdict(Totals)
    with torch.inference_mode():
        for v in variants:  # warm-up (first-call allocations, lazy imports)
            v.run(prompts[0][:32], 0)
        for i, prompt in enumerate(prompts):
            reference = None
            for v in variants:
                t0 = time.perf_counter()
                tokens, stats = v.run(prompt, 1000 + i)
                dt = time.perf_counter() - t0
                reference = tokens if reference is None else reference
                t = totals[v.label]
                t.tokens += len(tokens)
                t.time_s += dt
                t.runs += 1
                t.identical += tokens == reference
                t.repetition += repetition_rate(tokens)
                t.per_prompt_tps.append(len(tokens) / dt)
                if stats:
                    t.rounds += stats["num_rounds"]
                    t.spec_rounds += stats["num_spec_rounds"]
                    t.draft_tokens += stats["num_draft_tokens"]
                    t.accepted += stats["num_accepted_tokens"]
                    t.target_time_s += stats["target_time_s"]
                    t.draft_time_s += stats["draft_time_s"]
            print(f"[{target_name} {mode}] prompt {i + 1}/{len(prompts)}", flush=True)
    return summarize(variants, totals, greedy=mode == "greedy")


def summarize(variants: list[Variant], totals: dict[str, Totals], greedy: bool) -> dict:
    base_label = variants[0].label
    base_tps = totals[base_label].tokens / totals[base_label].time_s
    rows = []
    for v in variants:
        t = totals[v.label]
        tps = t.tokens / t.time_s
        row = {
            "family": v.family, "variant": v.label, "tokens_per_s": tps, "speedup": tps / base_tps,
            "repetition_rate": t.repetition / t.runs,
            "identical": f"{t.identical}/{t.runs}" if greedy else "n/a (sampled)",
        }
        if v.ours:
            tau = 1 + t.accepted / t.spec_rounds if t.spec_rounds else 1.0
            k_mean = t.draft_tokens / t.spec_rounds if t.spec_rounds else 0.0
            rounds = t.rounds + t.runs  # + prefill
            row.update(
                tau=tau, k_mean=k_mean, spec_round_share=t.spec_rounds / max(1, t.rounds),
                overhead_ms_per_round=1e3 * (t.time_s - t.target_time_s - t.draft_time_s) / rounds,
                draft_ms_per_round=1e3 * t.draft_time_s / rounds,
                target_ms_per_round=1e3 * t.target_time_s / rounds,
                projected_gpu_speedup=tau / (1 + k_mean * GPU_DRAFT_COST_RATIO + GPU_ROUND_TRIP_RATIO)
                if t.spec_rounds else 1.0,
            )
        rows.append(row)
    best: dict[str, dict] = {}
    for row in rows:
        if row["family"] not in best or row["tokens_per_s"] > best[row["family"]]["tokens_per_s"]:
            best[row["family"]] = row
    return {"rows": rows, "best": {f: r["variant"] for f, r in best.items()}}


def extra_factories(config, args) -> dict:
    """Proposer kinds beyond the core ones, when configured (sorted drafter, card)."""
    factories = {}
    for drafter in config.drafters:
        if drafter.kind == "sorted" and (not args.methods or "sorted" in args.methods):
            from drafter_service.sorted import SortedProposerFactory

            factories["sorted"] = SortedProposerFactory(drafter)
    return factories


def targets_check(results: dict) -> list[str]:
    """The issue's targets on codelm-target-m, as pass/fail lines."""
    lines = []
    for mode, per_target in results.items():
        summary = per_target.get("codelm-target-m")
        if not summary:
            continue
        by_variant = {r["variant"]: r for r in summary["rows"]}
        best = {f: by_variant[v] for f, v in summary["best"].items()}
        def tps(family: str) -> float:
            return best[family]["tokens_per_s"] if family in best else float("nan")

        base = "hf_greedy" if mode == "greedy" else "hf_sample"
        checks = [
            ("ours none within 5% of HF", tps("none") / tps(base), 0.95),
            ("draft_model >= 1.2x best HF assisted", tps("draft_model") / tps("hf_assisted"), 1.2),
            ("ngram >= 1.2x best HF prompt lookup", tps("ngram") / tps("hf_prompt_lookup"), 1.2),
            ("best ours >= 1.3x HF", max(tps(f) for f in best if f in OUR_FAMILIES) / tps(base), 1.3),
        ]
        overhead = best["none"].get("overhead_ms_per_round", float("nan"))
        lines += [f"- [{mode}] {name}: {ratio:.2f} ({'met' if ratio >= goal else 'NOT met'}, goal {goal})"
                  for name, ratio, goal in checks]
        lines.append(f"- [{mode}] per-round overhead outside forwards (none): {overhead:.3f} ms (goal <= 0.5)")
    return lines


def to_markdown(results: dict, env: dict) -> str:
    out = [f"# Speedup benchmark ({env['time']}, torch {env['torch']}, {env['threads']} thread)\n"]
    for mode, per_target in results.items():
        for target, summary in per_target.items():
            out.append(f"\n## {target}, {mode}\n")
            out.append("| variant | tok/s | speedup | τ | k mean | overhead ms/round | draft ms/round | GPU-projected | repetition | identical |")
            out.append("|---|---|---|---|---|---|---|---|---|---|")
            best = set(summary["best"].values())
            for r in summary["rows"]:
                name = f"**{r['variant']}**" if r["variant"] in best else r["variant"]
                f = lambda key, fmt="{:.2f}": fmt.format(r[key]) if key in r else ""  # noqa: E731
                out.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} | {f('tau')} | {f('k_mean')} | "
                           f"{f('overhead_ms_per_round', '{:.3f}')} | {f('draft_ms_per_round')} | {f('projected_gpu_speedup')} | "
                           f"{r['repetition_rate']:.2f} | {r['identical']} |")
    out.append("\n## Targets (codelm-target-m)\n")
    out += targets_check(results)
    return "\n".join(out) + "\n"


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, t, s) for m, pt in results.items() for t, s in pt.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (mode, target, summary) in zip(axes[0], panels):
        rows = {r["variant"]: r for r in summary["rows"]}
        fams = list(summary["best"])
        ax.bar(fams, [rows[summary["best"][f]]["speedup"] for f in fams])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{target} ({mode})")
        ax.set_ylabel("speedup over HF")
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["codelm-target-m", "codelm-target-s"])
    parser.add_argument("--modes", nargs="+", default=["greedy", "sample"], choices=["greedy", "sample"])
    parser.add_argument("--methods", nargs="*", default=None, help="our families to run (default all)")
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--e2e", action="store_true",
                        help="also measure end to end through the real `specdec serve` stack (gRPC)")
    parser.add_argument("--e2e-only", action="store_true", help="only the end-to-end part")
    args = parser.parse_args(argv)
    set_num_threads(args.threads)

    results: dict = {}
    if not args.e2e_only:
        for mode in args.modes:
            results[mode] = {t: run_target(t, args, mode) for t in args.targets}
    env = environment()
    markdown = to_markdown(results, env) if results else f"# Speedup benchmark ({env['time']})\n"
    payload = {"env": env, "args": vars(args), "results": results}
    if args.e2e or args.e2e_only:
        from bench import e2e

        payload["e2e"] = e2e.run_e2e(args)
        markdown += e2e.to_markdown(payload["e2e"])
    base = write_results("speedup", payload, markdown)
    if results:
        plot(results, base.with_suffix(".png"))
    print(markdown)
    print(f"results: {base}.{{json,md,png}}")


if __name__ == "__main__":
    main()
