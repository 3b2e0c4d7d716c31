"""Choose each speculation method's default on the training prompts (never on benchmark
prompts): run every candidate rule of a method on both demo targets, greedy and sampled
(T = 0.8), and keep the simplest candidate within `--tolerance` of the best one.

    python -m tools.choose_defaults                       # 20 training prompts x 64 tokens
    python -m tools.choose_defaults --methods sorted --modes greedy
    python -m tools.choose_defaults --reuse bench/results/choose-defaults-<time>.json

Each method gets a default per sampling mode (greedy requests get `when_greedy`): a
candidate's score is the worst, over the mode's target cells, of its tokens/s over the best
candidate's tokens/s in that cell, so a default must hold up on every target. Candidates
fall into classes of equal simplicity, simplest first: a fixed k at a fixed exit, then the
±2/−1 rule, then confidence exits (`simplicity`). The first class holding a candidate within
the tolerance of the top score gives the default: its best-scoring candidate (a fixed k = 2
is no simpler than k = 3, so the better of them wins). The report also names the best
candidate per target (for `TargetConfig.speculation` overrides).

Writes bench/results/choose-defaults-<time>.{json,md}; the chosen values go into
`shared.config.DEFAULT_METHODS` by hand, with the table in docs/speculation.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import environment, train_prompts_that_fit, write_results
from bench.harness import (
    describe,
    factories_for,
    markdown_table,
    our_variant,
    run_interleaved,
    sampling_for,
    summarize,
)
from shared.config import MethodSpeculation, SpeculationConfig, default_config
from shared.loading import set_num_threads
from tools.train_sorted import trained_on


def M(k: int, rule: str = "fixed", **params: float) -> MethodSpeculation:  # noqa: N802 - table literal
    return MethodSpeculation(rule=rule, num_speculative_tokens=k, drafter_params=params)


# grouped by `simplicity`, simplest first
CANDIDATES: dict[str, list[MethodSpeculation]] = {
    "ngram": [M(3), M(5), M(8), M(5, "plus2minus1")],
    "draft_model": [M(2), M(3), M(4), M(5), M(3, "plus2minus1")],
    "sorted": [
        *(M(k, fixed_exit=e) for e in (1, 2) for k in (3, 5, 7)),
        M(5, fixed_exit=3),
        M(5, "plus2minus1", fixed_exit=1),
        M(5, "plus2minus1", fixed_exit=2),
        M(5, fixed_exit=-1),  # S2D confidence exits at the drafter's thresholds (sorted.json)
        M(5, "plus2minus1", fixed_exit=-1),
    ],
}


def simplicity(spec: MethodSpeculation) -> int:
    """0: a fixed k (at a fixed exit); 1: the ±2/−1 rule; 2: S2D confidence exits."""
    if spec.drafter_params.get("fixed_exit", 1) < 0:
        return 2
    return int(spec.rule != "fixed")


def run_cell(engine, tokenizer, factories, target: str, mode: str, args, exclude: set[str]) -> list[dict]:
    sampling = sampling_for(mode, args.temperature)
    speculation = SpeculationConfig(load_aware=False)  # the rules alone
    variants = [our_variant(engine, tokenizer, speculation, "none", None, None, sampling, args.max_new_tokens)]
    for method in args.methods:
        for spec in CANDIDATES[method]:
            variants.append(our_variant(engine, tokenizer, speculation, method, spec, factories[method],
                                        sampling, args.max_new_tokens))  # fmt: skip
    prompts = train_prompts_that_fit(tokenizer, args.num_prompts, args.max_new_tokens, exclude=exclude)
    rows = summarize(variants, run_interleaved(variants, prompts, f"{target} {mode}"), mode == "greedy")
    for row, v in zip(rows, variants):
        row["candidate"] = v.label
    return rows


def choose(method: str, cells: dict[str, list[dict]], tolerance: float) -> dict:
    """cells: "target/mode" -> rows. Scores every candidate (worst cell ratio to the cell's best)."""
    labels = [f"ours {describe(method, c)}" for c in CANDIDATES[method]]
    ratios: dict[str, dict[str, float]] = {label: {} for label in labels}
    for cell, rows in cells.items():
        by = {r["variant"].removesuffix(" [default]"): r["tokens_per_s"] for r in rows}
        best = max(by[label] for label in labels)
        for label in labels:
            ratios[label][cell] = by[label] / best
    scores = {label: min(r.values()) for label, r in ratios.items()}
    index = pick(CANDIDATES[method], [scores[label] for label in labels], tolerance)
    per_target = {}
    for target in sorted({cell.split("/")[0] for cell in cells}):
        score_t = [min(v for c, v in ratios[label].items() if c.startswith(target + "/")) for label in labels]
        per_target[target] = labels[pick(CANDIDATES[method], score_t, tolerance)]
    return {"chosen": labels[index], "spec": CANDIDATES[method][index].model_dump(), "score": scores[labels[index]],
            "scores": scores, "ratios": ratios, "best_per_target": per_target}  # fmt: skip


def pick(candidates: list[MethodSpeculation], scores: list[float], tolerance: float) -> int:
    """The index of the best-scoring candidate of the simplest class that has one within
    `tolerance` of the top score."""
    top = max(scores)
    level = min(simplicity(c) for c, score in zip(candidates, scores) if score >= top - tolerance)
    return max((i for i, c in enumerate(candidates) if simplicity(c) == level), key=scores.__getitem__)


def run_cells(args) -> dict[str, list[dict]]:
    from verifier_service.engine import load_target

    config = default_config()
    # NOTE: the committed sorted drafter trained on a quarter of the prompts chosen before;
    # it drafts those better than anything users send (exit 1 looked best on them and lost
    # on HumanEval), so they are left out
    exclude = set().union(*(trained_on(d.model_dir) for d in config.drafters
                                 if (d.model_dir / "sorted.json").is_file()))  # fmt: skip
    factories = factories_for(config, args.methods)
    cells: dict[str, list[dict]] = {}
    for target in args.targets:
        engine, tokenizer = load_target(config.target(target))
        for mode in args.modes:
            cells[f"{target}/{mode}"] = run_cell(engine, tokenizer, factories, target, mode, args, exclude)
    return cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["codelm-target-m", "codelm-target-s"])
    parser.add_argument("--modes", nargs="+", default=["greedy", "sample"], choices=["greedy", "sample"])
    parser.add_argument("--methods", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--tolerance", type=float, default=0.02, help="simplest within this of the top score")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reuse", type=Path, help="choose again from a saved run's JSON instead of running")
    args = parser.parse_args(argv)
    set_num_threads(args.threads)
    if args.reuse:
        cells = json.loads(args.reuse.read_text())["cells"]
    else:
        cells = run_cells(args)
    # per mode: greedy outputs of the demo models repeat (long drafts pay), sampled ones do not
    modes = sorted({cell.split("/")[1] for cell in cells})
    choices = {
        f"{method}/{mode}": choose(method, {c: r for c, r in cells.items() if c.endswith("/" + mode)}, args.tolerance)
        for method in args.methods
        for mode in modes
    }

    env = environment()
    md = [f"# Speculation defaults on training prompts ({env['time']}, {args.num_prompts} prompts x "
          f"{args.max_new_tokens} tokens, torch {env['torch']}, {env['threads']} thread)\n"]  # fmt: skip
    for cell, rows in cells.items():
        md += [f"\n## {cell}\n", *markdown_table(rows)]
    md.append("\n## Chosen (score = worst cell's tokens/s over that cell's best candidate)\n")
    for method, c in choices.items():  # method = "<method>/<mode>"
        md.append(f"- **{method}: {c['chosen']}** (score {c['score']:.3f}); best per target: "
                  + ", ".join(f"{t}: {label}" for t, label in c["best_per_target"].items()))
        md += [f"  - {label}: {score:.3f}" for label, score in c["scores"].items()]
    markdown = "\n".join(md) + "\n"
    base = write_results("choose-defaults", {"env": env, "args": {**vars(args), "reuse": str(args.reuse or "")}, "cells": cells,
                                             "choices": choices}, markdown)  # fmt: skip
    print(markdown)
    print(f"results: {base}.{{json,md}}")


if __name__ == "__main__":
    main()
