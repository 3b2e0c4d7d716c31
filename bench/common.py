"""Helpers shared by benchmarks: prompt selection, output statistics, result files."""

from __future__ import annotations

import gzip
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.paths import PROJECT_ROOT, data_dir

RESULTS_DIR = PROJECT_ROOT / "bench" / "results"


def humaneval_prompts_that_fit(tokenizer, num_prompts: int, max_new_tokens: int, max_total: int = 256) -> list[list[int]]:
    """The first `num_prompts` HumanEval prompts whose prompt + generation fit in `max_total`."""
    chosen = []
    with gzip.open(data_dir() / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        for line in f:
            ids = tokenizer(json.loads(line)["prompt"]).input_ids
            if len(ids) + max_new_tokens <= max_total:
                chosen.append(ids)
            if len(chosen) == num_prompts:
                break
    return chosen


def train_prompts_that_fit(tokenizer, num_prompts: int, max_new_tokens: int, max_total: int = 256,
                           stride: int = 7, exclude: set[str] = frozenset()) -> list[list[int]]:  # fmt: skip
    """Every `stride`-th training prompt (drafters and defaults are tuned on these, never on
    benchmark prompts) of at least 16 tokens whose prompt + generation fit in `max_total`,
    but none of `exclude` (prompts a drafter was trained on)."""
    chosen = []
    with open(data_dir() / "train_prompts" / "code_prompts.jsonl") as f:
        for i, line in enumerate(f):
            if i % stride:
                continue
            prompt = json.loads(line)["prompt"]
            if prompt in exclude:
                continue
            ids = tokenizer(prompt).input_ids
            if 16 <= len(ids) and len(ids) + max_new_tokens <= max_total:
                chosen.append(ids)
            if len(chosen) == num_prompts:
                break
    return chosen


def repetition_rate(token_ids: list[int], n: int = 4) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same output (0 = no loops)."""
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def environment() -> dict:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }


def write_results(name: str, payload: dict, markdown: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = RESULTS_DIR / f"{name}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    base.with_suffix(".md").write_text(markdown)
    return base


@dataclass(slots=True)
class Totals:
    """One variant's requests summed: tokens per target forward over all rounds (prefill
    included), τ and tok/s, as the store benchmarks report them."""

    tokens: int = 0
    steps: int = 0
    spec_rounds: int = 0
    accepted: int = 0
    time_s: float = 0.0

    def add(self, result, seconds: float) -> None:
        """One request's `GenerationResult`, served in `seconds`."""
        stats = result.stats
        self.tokens += result.completion_tokens
        self.steps += stats.num_rounds + 1  # + the prefill step
        self.spec_rounds += stats.num_spec_rounds
        self.accepted += stats.num_accepted_tokens
        self.time_s += seconds

    def summary(self) -> dict[str, float]:
        return {
            "tokens_per_forward": self.tokens / self.steps,
            "tau": 1 + self.accepted / self.spec_rounds if self.spec_rounds else 1.0,
            "tok_s": self.tokens / self.time_s,
        }
