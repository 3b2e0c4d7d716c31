"""Runs speculation variants of our loop (and Hugging Face baselines) over prompts, interleaved
prompt by prompt, and summarises each as tokens/s, τ and round statistics.

Shared by `bench.speedup` (HumanEval, against HF) and `tools.choose_defaults` (training
prompts, to choose each method's default). Each of our variants is a method plus a
`MethodSpeculation` (rule, k, drafter params) on its own `RulePolicy`, sharing one target
engine; `None` means the configured default, i.e. what users get.

GPU projection (labelled as such everywhere): a verify forward ≈ one step, a draft token
costs c = 0.05 steps for model drafters (0 for n-gram), no round trip (r = 0), so

    projected speedup = (tokens per round, all rounds) / (1 + k̄ · c + r)

with k̄ = draft tokens per round over all rounds (k = 0 rounds included).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.common import repetition_rate
from shared.config import MethodSpeculation, SpeculationConfig
from shared.sampling import SamplingParams
from shared.types import GenerationRequest

GPU_DRAFT_COST_RATIO = {"ngram": 0.0}  # per method; model drafters: DEFAULT_GPU_DRAFT_COST_RATIO
DEFAULT_GPU_DRAFT_COST_RATIO = 0.05
GPU_ROUND_TRIP_RATIO = 0.0


@dataclass
class Variant:
    family: str  # hf_greedy, hf_assisted, ..., or one of our methods
    label: str
    run: Callable[[list[int], int], tuple[list[int], dict | None]]  # (prompt, seed) -> (tokens, stats)
    ours: bool = False
    default: bool = False  # our configured default for its method


@dataclass
class Totals:
    tokens: int = 0
    time_s: float = 0.0
    identical: int = 0
    runs: int = 0
    repetition: float = 0.0  # summed over runs: share of repeated 4-grams (greedy loops)
    rounds: int = 0
    spec_rounds: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    target_time_s: float = 0.0
    draft_time_s: float = 0.0
    exit_drafted: dict[int, int] = field(default_factory=dict)  # sorted: draft tokens per exit
    exit_accepted: dict[int, int] = field(default_factory=dict)

    def add_stats(self, stats: dict) -> None:
        self.rounds += stats["num_rounds"]
        self.spec_rounds += stats["num_spec_rounds"]
        self.draft_tokens += stats["num_draft_tokens"]
        self.accepted += stats["num_accepted_tokens"]
        self.target_time_s += stats["target_time_s"]
        self.draft_time_s += stats["draft_time_s"]
        for e, n in stats["num_draft_tokens_per_exit"].items():
            self.exit_drafted[e] = self.exit_drafted.get(e, 0) + n
        for e, n in stats["num_accepted_tokens_per_exit"].items():
            self.exit_accepted[e] = self.exit_accepted.get(e, 0) + n


def sampling_for(mode: str, temperature: float) -> SamplingParams:
    return SamplingParams() if mode == "greedy" else SamplingParams(temperature=temperature)


def describe(method: str, spec: MethodSpeculation) -> str:
    rule = f"k={spec.num_speculative_tokens}" if spec.rule == "fixed" else f"±2/−1 from {spec.num_speculative_tokens}"
    params = ", ".join(f"{k} {v:g}" for k, v in spec.drafter_params.items())
    return f"{method} {rule}" + (f" ({params})" if params else "")


def our_variant(engine, tokenizer, speculation: SpeculationConfig, method: str,
                spec: MethodSpeculation | None, factory, sampling: SamplingParams,
                max_new_tokens: int) -> Variant:  # fmt: skip
    """Our loop with `method`; `spec` None = the configured default of `speculation`. A
    variant other than the default measures its rule alone (no load arms, which could
    step it aside); the default is what users get, load arms included."""
    from verifier_service.loop import SpecDecodeLoop
    from verifier_service.policy import RulePolicy

    configured = speculation.methods.get(method)
    configured = configured.for_request(sampling.greedy) if configured else None
    default = spec is None or spec == configured
    if spec is not None:
        speculation = speculation.with_overrides({method: spec})
    if not default:
        speculation = speculation.model_copy(update={"load_aware": False})
    loop = SpecDecodeLoop(engine, tokenizer, RulePolicy(speculation))
    chosen = spec if spec is not None else configured
    label = f"ours {describe(method, chosen) if chosen else method}" + (" [default]" if default and chosen else "")

    def run(prompt: list[int], seed: int) -> tuple[list[int], dict]:
        params = SamplingParams(sampling.temperature, seed=None if sampling.greedy else seed)
        request = GenerationRequest(prompt_ids=prompt, max_new_tokens=max_new_tokens,
                                    sampling=params, method=method)  # fmt: skip
        proposer = factory.new_session(prompt, params) if factory else None
        *_, result = loop.generate(request, proposer)
        return result.token_ids, result.stats.to_dict()

    return Variant(method, label, run, ours=True, default=default and method != "none")


def factories_for(config, methods: list[str]) -> dict:
    """In-process proposer factories of the configured drafters for `methods`."""
    from drafter_service.draft_model import DraftModelProposerFactory
    from shared.ngram import NgramProposerFactory

    out = {}
    if "ngram" in methods:
        out["ngram"] = NgramProposerFactory(config.ngram)
    if "draft_model" in methods:
        out["draft_model"] = DraftModelProposerFactory(next(d for d in config.drafters if d.kind == "draft_model"))
    if "sorted" in methods:
        from drafter_service.sorted import SortedProposerFactory

        out["sorted"] = SortedProposerFactory(next(d for d in config.drafters if d.kind == "sorted"))
    return out


def run_interleaved(variants: list[Variant], prompts: list[list[int]], tag: str) -> dict[str, Totals]:
    """Every variant on prompt 0, then prompt 1, ... so machine drift hits all alike; the
    first variant's output is the reference for `identical`."""
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
                if stats:
                    t.add_stats(stats)
            print(f"[{tag}] prompt {i + 1}/{len(prompts)}", flush=True)
    return totals


def summarize(variants: list[Variant], totals: dict[str, Totals], greedy: bool) -> list[dict]:
    """One row per variant; `speedup` is over the first variant (the baseline)."""
    base = totals[variants[0].label]
    base_tps = base.tokens / base.time_s
    rows = []
    for v in variants:
        t = totals[v.label]
        tps = t.tokens / t.time_s
        row = {"family": v.family, "variant": v.label, "default": v.default, "tokens_per_s": tps,
               "speedup": tps / base_tps, "repetition_rate": t.repetition / t.runs,
               "identical": f"{t.identical}/{t.runs}" if greedy else "n/a (sampled)"}  # fmt: skip
        if v.ours:
            rounds = max(1, t.rounds)
            k_all = t.draft_tokens / rounds
            tokens_per_round = (t.tokens - t.runs) / rounds  # the prefill emits each run's first token
            c = GPU_DRAFT_COST_RATIO.get(v.family, DEFAULT_GPU_DRAFT_COST_RATIO)
            row.update(
                tau=1 + t.accepted / t.spec_rounds if t.spec_rounds else 1.0,
                k_mean=t.draft_tokens / t.spec_rounds if t.spec_rounds else 0.0,
                spec_round_share=t.spec_rounds / rounds,
                tokens_per_round=tokens_per_round,
                gpu_projected=tokens_per_round / (1 + k_all * c + GPU_ROUND_TRIP_RATIO),
                overhead_ms_per_round=1e3 * (t.time_s - t.target_time_s - t.draft_time_s) / (rounds + t.runs),
                draft_ms_per_draft_token=1e3 * t.draft_time_s / t.draft_tokens if t.draft_tokens else None,
            )  # fmt: skip
            if t.exit_drafted:
                drafted = sum(t.exit_drafted.values())
                row["exit_share"] = {str(e): n / drafted for e, n in sorted(t.exit_drafted.items())}
                row["exit_acceptance"] = {str(e): t.exit_accepted.get(e, 0) / n
                                          for e, n in sorted(t.exit_drafted.items())}  # fmt: skip
        rows.append(row)
    return rows


def default_vs_best(rows: list[dict]) -> dict[str, dict]:
    """Per method: its default's tokens/s over its best variant's (the default included)."""
    out = {}
    for method in {r["family"] for r in rows if r.get("default")}:
        mine = [r for r in rows if r["family"] == method and "tau" in r]
        best = max(mine, key=lambda r: r["tokens_per_s"])
        default = next(r for r in mine if r["default"])
        out[method] = {"default": default["variant"], "best": best["variant"],
                       "ratio": default["tokens_per_s"] / best["tokens_per_s"]}  # fmt: skip
    return out


def markdown_table(rows: list[dict]) -> list[str]:
    out = ["| variant | tok/s | × base | τ | k̄ (spec rounds) | spec-round share | tokens/round (all) "
           "| GPU-projected (all rounds) | draft ms/token | overhead ms/round | repetition | identical |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        name = f"**{r['variant']}**" if r.get("default") else r["variant"]

        def f(key, fmt="{:.2f}"):
            return "" if r.get(key) is None else fmt.format(r[key])

        out.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} | {f('tau')} | {f('k_mean')} | "
                   f"{f('spec_round_share')} | {f('tokens_per_round')} | {f('gpu_projected')} | "
                   f"{f('draft_ms_per_draft_token', '{:.3f}')} | {f('overhead_ms_per_round', '{:.3f}')} | "
                   f"{f('repetition_rate')} | {r['identical']} |")  # fmt: skip
    return out
