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

Method `sorted` (S2D, issue 4) runs four variants, all with the adaptive k policy: `adaptive`
(the verifier's exit policy picks the thresholds, starting from the target's calibration)
and fixed exits 1, 2, 3 (`drafter_params={"fixed_exit": e}`); each reports per-exit
acceptance (accepted / drafted per exit), τ and drafting ms per draft token beside tokens/s.
`--per-target-drafters DIR_M,DIR_S` adds, per target, the adaptive run of a drafter tuned
for that target alone (same format as models/codelm-sorted), for the shared-vs-own τ line:

    python -m bench.speedup --methods sorted draft_model --modes greedy \
        --per-target-drafters .cache/per_target/sorted-m-only,.cache/per_target/sorted-s-only
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
PER_TARGET_FAMILY = "sorted_per_target"  # a drafter tuned for one target (comparison only)
SORTED_FIXED_EXITS = (1, 2, 3)
DEMO_TARGETS = ("codelm-target-m", "codelm-target-s")


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
    exit_drafted: dict[int, int] = field(default_factory=dict)  # sorted: draft tokens per exit
    exit_accepted: dict[int, int] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)  # the policy's last choice


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


def our_variants(loop, factories: dict, sampling: SamplingParams, max_new_tokens: int,
                 own_sorted: tuple | None = None) -> list[Variant]:  # fmt: skip
    """Our loop per family; `own_sorted` = (loop, factory) of a drafter tuned for this target."""

    def make(family: str, label: str, k: int | None, drafter_params: dict | None = None,
             factory=None, spec_loop=None) -> Variant:  # fmt: skip
        factory = factory or factories.get(family)
        spec_loop = spec_loop or loop
        method = "sorted" if family == PER_TARGET_FAMILY else family

        def run(prompt: list[int], seed: int) -> tuple[list[int], dict]:
            params = SamplingParams(sampling.temperature, seed=None if sampling.greedy else seed)
            request = GenerationRequest(prompt_ids=prompt, max_new_tokens=max_new_tokens,
                                        sampling=params, method=method, num_speculative_tokens=k,
                                        drafter_params=dict(drafter_params or {}))  # fmt: skip
            proposer = factory.new_session(prompt, params) if factory else None
            *_, result = spec_loop.generate(request, proposer)
            return result.token_ids, result.stats.to_dict()

        return Variant(family, label, run, ours=True)

    variants = [make("none", "ours none", None)]
    for family in factories:
        if family == "sorted":
            # NOTE: each variant keeps its own learned k policy (the loop keys them by params)
            variants.append(make(family, "ours sorted adaptive", None))
            variants += [make(family, f"ours sorted exit {e}", None, {"fixed_exit": float(e)})
                         for e in SORTED_FIXED_EXITS]  # fmt: skip
            continue
        variants += [make(family, f"ours {family} adaptive", None),
                     make(family, f"ours {family} k=3", 3), make(family, f"ours {family} k=5", 5)]
    if own_sorted is not None:
        own_loop, own_factory = own_sorted
        variants.append(make(PER_TARGET_FAMILY, "ours sorted own-drafter adaptive", None,
                             factory=own_factory, spec_loop=own_loop))  # fmt: skip
    return variants


def per_target_drafters(arg: str | None) -> dict[str, str]:
    """`DIR_M,DIR_S` (the demo targets in order) or `NAME=DIR,...` -> {target: dir}."""
    if not arg:
        return {}
    out = {}
    for i, item in enumerate(x for x in arg.split(",") if x):
        name, sep, path = item.partition("=")
        if not sep:
            name, path = DEMO_TARGETS[i], item
        out[name] = path
    return out


def own_sorted_drafter(engine, tokenizer, target_name: str, model_dir: str):
    """(loop, factory) for a sorted drafter tuned for `target_name` alone: its own loop, so
    its exit policy and k learn apart from the shared drafter's."""
    from pathlib import Path

    from drafter_service.sorted import SortedProposerFactory
    from shared.config import DrafterConfig
    from verifier_service.exit_policy import load_exit_setup
    from verifier_service.loop import SpecDecodeLoop

    config = DrafterConfig(name=f"{Path(model_dir).name}", model_dir=Path(model_dir), kind="sorted")
    factory = SortedProposerFactory(config)
    setup = load_exit_setup(model_dir, target_name)
    return SpecDecodeLoop(engine, tokenizer, SpeculationConfig(), exit_setup=setup), factory


def run_target(target_name: str, args, mode: str) -> dict:
    from drafter_service.draft_model import DraftModelProposerFactory
    from shared.ngram import NgramProposerFactory
    from verifier_service.engine import load_target
    from verifier_service.loop import SpecDecodeLoop

    from shared.loading import load_model
    from verifier_service.servicer import exit_setup_for

    config = default_config()
    engine, tokenizer = load_target(config.target(target_name))
    loop = SpecDecodeLoop(engine, tokenizer, SpeculationConfig(),
                          exit_setup=exit_setup_for(config, target_name))  # fmt: skip
    draft_factory = DraftModelProposerFactory(config.drafters[0])
    factories = {"ngram": NgramProposerFactory(config.ngram), "draft_model": draft_factory}
    factories.update(extra_factories(config, args))
    sampling = SamplingParams() if mode == "greedy" else SamplingParams(temperature=args.temperature)
    # NOTE: the lean draft_model path keeps no HF module; HF assisted needs one
    hf_draft = getattr(draft_factory, "model", None) or load_model(config.drafters[0])
    variants = hf_variants(engine.model, hf_draft, sampling, args.max_new_tokens)
    own_dir = per_target_drafters(args.per_target_drafters).get(target_name)
    own = own_sorted_drafter(engine, tokenizer, target_name, own_dir) if own_dir else None
    variants += our_variants(loop, factories, sampling, args.max_new_tokens, own)
    if args.methods:
        keep = {*args.methods, "none", PER_TARGET_FAMILY}
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
                    for e, n in stats["num_draft_tokens_per_exit"].items():
                        t.exit_drafted[e] = t.exit_drafted.get(e, 0) + n
                    for e, n in stats["num_accepted_tokens_per_exit"].items():
                        t.exit_accepted[e] = t.exit_accepted.get(e, 0) + n
                    t.thresholds = {k: v for k, v in stats["policy"].items() if k.startswith("threshold.")}
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
                draft_ms_per_draft_token=1e3 * t.draft_time_s / t.draft_tokens if t.draft_tokens else None,
            )
            if v.family in ("sorted", PER_TARGET_FAMILY) and t.exit_drafted:
                drafted = sum(t.exit_drafted.values())
                row.update(
                    exit_acceptance={str(e): t.exit_accepted.get(e, 0) / n
                                     for e, n in sorted(t.exit_drafted.items())},
                    exit_share={str(e): n / drafted for e, n in sorted(t.exit_drafted.items())},
                    mean_exit=sum(e * n for e, n in t.exit_drafted.items()) / drafted,
                    thresholds=t.thresholds,
                )  # fmt: skip
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


def _check(name: str, ratio: float, goal: float) -> str:
    if ratio != ratio:  # NaN: a variant is missing
        return f"{name}: n/a (not run)"
    return f"{name}: {ratio:.2f} ({'met' if ratio >= goal else 'NOT met'}, goal >= {goal})"


def sorted_targets_check(results: dict) -> list[str]:
    """Issue 4's targets per mode and target, as pass/fail lines."""
    lines = []
    nan = float("nan")
    for mode, per_target in results.items():
        for target, summary in per_target.items():
            rows = {r["variant"]: r for r in summary["rows"]}
            best = {f: rows[v] for f, v in summary["best"].items()}
            adaptive = rows.get("ours sorted adaptive")
            fixed = [rows[f"ours sorted exit {e}"] for e in SORTED_FIXED_EXITS
                     if f"ours sorted exit {e}" in rows]  # fmt: skip
            own = rows.get("ours sorted own-drafter adaptive")
            sorted_best, draft_best = best.get("sorted"), best.get("draft_model")
            tag = f"- [{mode}] {target}"
            if sorted_best and draft_best:
                lines.append(f"{tag} " + _check(
                    f"sorted τ ({sorted_best['variant']}) / codelm-draft τ ({draft_best['variant']})",
                    sorted_best["tau"] / draft_best["tau"], 1.0))  # fmt: skip
                lines.append(f"{tag} " + _check(
                    "codelm-draft / sorted drafting ms per draft token (no more cost: >= 1)",
                    (draft_best["draft_ms_per_draft_token"] or nan)
                    / (sorted_best["draft_ms_per_draft_token"] or nan), 1.0))  # fmt: skip
            if adaptive and fixed:
                top = max(fixed, key=lambda r: r["tokens_per_s"])
                lines.append(f"{tag} " + _check(
                    f"sorted adaptive / best fixed exit ({top['variant']}) tokens/s",
                    adaptive["tokens_per_s"] / top["tokens_per_s"], 1.0))  # fmt: skip
            if adaptive and own:
                lines.append(f"{tag} " + _check(
                    "shared drafter τ / per-target drafter τ (adaptive; within 10 %)",
                    adaptive["tau"] / own["tau"], 0.9))  # fmt: skip
            if target == "codelm-target-m" and sorted_best and draft_best:
                lines.append(f"{tag} " + _check(
                    "sorted / draft_model tokens/s (best variants)",
                    sorted_best["tokens_per_s"] / draft_best["tokens_per_s"], 1.2))  # fmt: skip
    return lines


def sorted_markdown(results: dict) -> list[str]:
    """Per target: the sorted variants (and codelm-draft) with per-exit acceptance."""
    out = []
    for mode, per_target in results.items():
        for target, summary in per_target.items():
            rows = [r for r in summary["rows"]
                    if r["family"] in ("sorted", PER_TARGET_FAMILY, "draft_model")]  # fmt: skip
            if not any(r["family"] == "sorted" for r in rows):
                continue
            out.append(f"\n## S2D sorted: {target}, {mode}\n")
            out.append("| variant | tok/s | speedup | τ | k mean | draft ms / draft token | "
                       "acceptance per exit (accepted / drafted) | exit share | mean exit | thresholds |")
            out.append("|---|---|---|---|---|---|---|---|---|---|")
            for r in rows:
                acc = " / ".join(f"e{e} {a:.2f}" for e, a in r.get("exit_acceptance", {}).items())
                share = " / ".join(f"e{e} {a:.2f}" for e, a in r.get("exit_share", {}).items())
                thr = ", ".join(f"{k.split('.')[1]}: {v:g}" for k, v in r.get("thresholds", {}).items())
                dm = r.get("draft_ms_per_draft_token")
                out.append(
                    f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} | {r['tau']:.2f} | "
                    f"{r['k_mean']:.2f} | {'' if dm is None else f'{dm:.3f}'} | {acc} | {share} | "
                    f"{r.get('mean_exit', float('nan')):.2f} | {thr} |"
                )
    if out:
        out.append("\n## Targets (issue 4, S2D sorted)\n")
        out += sorted_targets_check(results)
    return out


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
    out += sorted_markdown(results)
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
    parser.add_argument("--per-target-drafters", metavar="DIR_M,DIR_S",
                        help="sorted drafters tuned for one target each (codelm-target-m, "
                        "codelm-target-s in that order, or NAME=DIR pairs): their adaptive τ "
                        "beside the shared drafter's")  # fmt: skip
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
