"""`python -m verifier_service.calibrate --target NAME [--drafter NAME | --drafter-dir DIR] [--num-prompts N]`

Calibrates the exit thresholds and the initial k of a nested (`sorted`) drafter for one
target and writes them into the drafter's `calibration.json`, keyed by target name; the
verifier of that target loads its entry at start-up (`exit_policy.load_exit_setup`) as the
starting threshold vector and the priors of its exit policy.

What it measures (greedy, one torch thread, on `../shared/data/train_prompts` prompts that
the demo drafter was not trained on: the seed-0 shuffle after its first 1000, never a
benchmark prompt):

1. the target's greedy continuation of every prompt (the verifier's own loop, k = 0), and
   its costs: a one-token step v0 and a verify forward of k + 1 tokens, r_k = verify / v0;
2. per draft position and exit, teacher-forced along that continuation: the exit's
   confidence (top probability) and whether its argmax is the target's token. In greedy
   decoding a draft token is judged only if the earlier ones were accepted, i.e. equal the
   target's tokens, so these per-position matches give the exact accepted length of every
   round: rounds with any (thresholds, k) are *simulated* exactly from one pass;
3. drafting seconds per draft token c(θ) of every threshold vector θ of a grid (0, 0.1,
   0.2, 0.3, 0.4, 0.6, 0.8, 0.9, never per non-deepest exit), measured with the lean drafter
   the pool runs, in greedy rounds along the continuations. Measured, not modelled from
   per-exit costs: a deep token after shallow ones also fills the deeper layers of those
   (lazy fill, more rows per matmul), so mixed vectors cost more than their exit mix.

It then picks the vector and k maximising simulated tokens/s,
`tokens per round / (v0 · r_k + k · c(θ))`, and also the best vectors were drafting twice
as cheap and twice as dear (machine load moves that ratio; the online policy picks among
them by measured tokens/s). Written per target: the chosen thresholds and k, every arm (those three and each
fixed exit) with its simulated per-position acceptance α_j, drafting cost over v0, τ and
predicted speedup, and the per-exit match rates and costs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from verifier_service.exit_policy import CALIBRATION_FILE, NEVER_EXIT, fixed_exit_vector

logger = logging.getLogger("verifier_service.calibrate")

# Thresholds tried per non-deepest exit (each vector's drafting cost is measured, so coarse)
GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 0.9, NEVER_EXIT]
COST_SCALES = {"calibrated": 1.0, "cheap_drafting": 0.5, "dear_drafting": 2.0}
PROMPT_SKIP = 1000  # the drafter's training took the first 640 of the same shuffle
MAX_PROMPT_TOKENS = 128


@dataclass
class Sequence_:
    """One calibration sequence: target continuation and the drafter's view of it."""

    prompt: list[int]
    continuation: list[int]  # the target's greedy tokens c_0 .. c_{L-1}
    conf: np.ndarray  # [num_exits, L] confidence of the prediction of c_i (i >= 1 used)
    match: np.ndarray  # [num_exits, L] bool: the exit's argmax == c_i


@dataclass
class Costs:
    v0_s: float  # one-token target step
    verify_ratio: list[float]  # [max_k + 1] verify forward of k + 1 tokens over v0 (index k)


# ------------------------------------------------------------------ simulation (pure)


def chosen_exits(conf: np.ndarray, thresholds: list[float]) -> np.ndarray:  # [L] exit index
    """The exit rule of `sorted_model`: the first exit whose confidence clears its
    threshold; the deepest always emits. `thresholds`: non-deepest exits, in order."""
    num_exits = conf.shape[0]
    chosen = np.full(conf.shape[1], num_exits - 1)
    for i in reversed(range(num_exits - 1)):
        chosen = np.where(conf[i] >= thresholds[i], i, chosen)
    return chosen


def run_lengths(ok: np.ndarray) -> np.ndarray:  # [L] consecutive True from each position
    out = np.zeros(len(ok) + 1, dtype=np.int64)
    for i in range(len(ok) - 1, -1, -1):
        out[i] = out[i + 1] + 1 if ok[i] else 0
    return out[:-1]


@dataclass
class SimResult:
    rounds: int
    tokens: int  # emitted by speculative rounds (accepted + one per round)
    drafted_per_exit: list[float]  # draft tokens by the exit (index) they left at
    tried: list[int]  # per position j: rounds that reached it
    accepted: list[int]  # per position j: rounds that accepted it

    @property
    def tau(self) -> float:
        return self.tokens / max(1, self.rounds)

    @property
    def drafted(self) -> float:
        return sum(self.drafted_per_exit)

    def draft_s_per_token(self, token_cost_s: list[float]) -> float:
        """Mean drafting seconds per draft token, given each exit's cost per token."""
        total = sum(n * c for n, c in zip(self.drafted_per_exit, token_cost_s))
        return total / max(1.0, self.drafted)


def simulate(seqs: list[Sequence_], thresholds: list[float], k: int) -> SimResult:
    """Greedy rounds of k drafts along each continuation (exact for accepted lengths)."""
    num_exits = seqs[0].conf.shape[0] if seqs else 1
    res = SimResult(0, 0, [0.0] * num_exits, [0] * k, [0] * k)
    for seq in seqs:
        chosen = chosen_exits(seq.conf, thresholds)
        ok = seq.match[chosen, np.arange(len(chosen))]
        runs = run_lengths(ok).tolist()
        length = len(seq.continuation)
        times_drafted = np.zeros(length + 1)  # difference array: rounds overlap
        s = 1  # c_0 comes from the prefill
        while s < length:
            drafted = min(k, length - s)
            acc = min(runs[s], drafted)
            res.rounds += 1
            res.tokens += acc + 1
            times_drafted[s] += 1
            times_drafted[s + drafted] -= 1
            for j in range(min(drafted, acc + 1)):
                res.tried[j] += 1
            for j in range(acc):
                res.accepted[j] += 1
            s += acc + 1
        counts = np.bincount(chosen, weights=np.cumsum(times_drafted)[:length], minlength=num_exits)
        res.drafted_per_exit = [a + float(b) for a, b in zip(res.drafted_per_exit, counts)]
    return res


def rate(tau: float, k: int, costs: Costs, draft_s_per_token: float) -> float:
    """Tokens per second of rounds with mean τ (the policy's cost model)."""
    return tau / (costs.v0_s * costs.verify_ratio[k] + k * draft_s_per_token)


def grid_vectors(num_exits: int) -> list[list[float]]:
    """Every threshold vector of the grid (vectors that act alike listed once)."""
    out: list[list[float]] = [[]]
    for _ in range(num_exits - 1):
        out = [v + [t] for v in out for t in GRID]
    unique, seen = [], set()
    for v in out:
        # after a 0 threshold the deeper thresholds are never consulted
        cut = next((i for i, t in enumerate(v) if t == 0.0), None)
        key = tuple(v[: cut + 1] + [NEVER_EXIT] * (len(v) - cut - 1)) if cut is not None else tuple(v)
        if key not in seen:
            seen.add(key)
            unique.append(list(key))
    return unique


def best_vectors(
    seqs: list[Sequence_], draft_s: dict[tuple, float], costs: Costs, scales: dict[str, float],
    max_k: int,
) -> dict[str, tuple[list[float], int, float]]:  # fmt: skip
    """Per cost scale: (vector, k, tokens/s) with drafting `scale` x as dear, over the
    vectors of `draft_s` (vector -> measured drafting seconds per draft token)."""
    best = {name: ([], 0, 0.0) for name in scales}
    for v, d in draft_s.items():
        for k in range(1, max_k + 1):
            sim = simulate(seqs, list(v), k)
            if not sim.rounds:
                continue
            for name, scale in scales.items():
                r = rate(sim.tau, k, costs, d * scale)
                if r > best[name][2]:
                    best[name] = (list(v), k, r)
    return best


# ------------------------------------------------------------------ measurement


def load_calibration_prompts(
    tokenizer, num: int, max_new_tokens: int, max_total: int = 256
) -> list[list[int]]:
    from shared.paths import data_dir

    path = data_dir() / "train_prompts" / "code_prompts.jsonl"
    with open(path) as f:
        texts = [json.loads(line)["prompt"] for line in f if line.strip()]
    import random

    random.Random(0).shuffle(texts)
    out = []
    for text in texts[PROMPT_SKIP:]:
        ids = tokenizer(text)["input_ids"][-MAX_PROMPT_TOKENS:]
        if ids and len(ids) + max_new_tokens <= max_total:
            out.append(ids)
        if len(out) == num:
            break
    return out


def target_continuations(loop, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from shared.types import GenerationRequest

    out = []
    for p in prompts:
        *_, result = loop.generate(GenerationRequest(prompt_ids=p, max_new_tokens=max_new_tokens), None)
        out.append(result.token_ids)
    return out


@torch.inference_mode()
def measure_target_costs(
    engine, prompts: list[list[int]], max_k: int, reps: int = 8
) -> tuple[float, list[float]]:
    """(v0 seconds, verify(k) / v0 for k = 0 .. max_k): per prompt the best of 3 forwards of
    1 and k + 1 tokens after its prefill, median over prompts; made non-decreasing in k."""
    steps, ratios = [], [[] for _ in range(max_k + 1)]
    for p in prompts[:reps]:
        session = engine.new_session()
        engine.forward(session, p, last_only=True)
        n = len(p)
        times = [math.inf] * (max_k + 1)
        for _ in range(3):
            for k in range(max_k + 1):
                t0 = time.perf_counter()
                engine.forward(session, [p[-1]] * (k + 1))
                times[k] = min(times[k], time.perf_counter() - t0)
                engine.rollback(session, n)
        steps.append(times[0])
        for k in range(max_k + 1):
            ratios[k].append(times[k] / times[0])
    out = [statistics.median(r) for r in ratios]
    for k in range(1, len(out)):
        out[k] = max(out[k], out[k - 1])
    out[0] = 1.0
    return statistics.median(steps), out


@torch.inference_mode()
def exit_views(drafter_model, exits: list[int], prompts, continuations) -> list[Sequence_]:
    """Teacher-forced confidence and match of every exit along each continuation."""
    from drafter_service.sorted_model import sorted_exit_hidden

    out = []
    for p, c in zip(prompts, continuations):
        ids = torch.tensor([p + c])
        hidden = sorted_exit_hidden(drafter_model, ids, exits)
        # position len(p) - 1 + i predicts c_i
        start = len(p) - 1
        probs = [
            torch.softmax(drafter_model.lm_head(h[0, start : start + len(c)]).float(), -1)
            for h in hidden
        ]
        conf = np.stack([pr.max(-1).values.numpy() for pr in probs])
        arg = np.stack([pr.argmax(-1).numpy() for pr in probs])
        match = arg == np.asarray(c)[None, :]
        out.append(Sequence_(p, c, conf, match))
    return out


@torch.inference_mode()
def measure_draft_cost(factory, seqs: list[Sequence_], thresholds: dict[int, float], k: int = 5,
                       reps: int = 3) -> tuple[float, float]:  # fmt: skip
    """(seconds per draft token, mean exit depth) of greedy rounds with the real lean
    drafter along the calibration continuations (best of `reps`)."""
    from drafter_service.sorted import SortedProposer
    from shared.sampling import SamplingParams

    best, mean_exit = math.inf, 0.0
    for _ in range(reps):
        elapsed, drafted, exit_sum = 0.0, 0, 0
        for seq in seqs:
            proposer = SortedProposer(factory, SamplingParams())
            proposer.set_thresholds(thresholds)
            full = seq.prompt + seq.continuation
            s = len(seq.prompt) + 1
            while s < len(full):
                t0 = time.perf_counter()
                draft = proposer.propose(full[:s], min(k, len(full) - s))
                elapsed += time.perf_counter() - t0
                drafted += len(draft)
                exit_sum += sum(draft.exit_layers or [])
                acc = 0
                while acc < len(draft) and draft.token_ids[acc] == full[s + acc]:
                    acc += 1
                s += acc + 1
            proposer.close()
        if drafted and elapsed / drafted < best:
            best, mean_exit = elapsed / drafted, exit_sum / drafted
    return best, mean_exit


# ------------------------------------------------------------------ calibration


def arm_entry(name: str, exits: list[int], vector: list[float], seqs, costs: Costs, draft_s: float,
              mean_exit: float, max_k: int) -> dict:  # fmt: skip
    """One arm for calibration.json: thresholds, α_j, cost ratio, τ and speedup at its best k
    (with the drafting cost measured for it)."""
    sims = {k: simulate(seqs, vector, k) for k in range(1, max_k + 1)}
    best_k = max(sims, key=lambda k: rate(sims[k].tau, k, costs, draft_s))
    deep = sims[max_k]
    acceptance = [round(a / t, 3) for a, t in zip(deep.accepted, deep.tried) if t]
    return {
        "name": name,
        "thresholds": {str(e): t for e, t in zip(exits[:-1], vector)},
        "acceptance": acceptance,
        "draft_cost_ratio": round(draft_s / costs.v0_s, 4),
        "draft_ms_per_token": round(1e3 * draft_s, 3),
        "mean_exit": round(mean_exit, 3),
        "best_k": best_k,
        "tau": round(sims[best_k].tau, 3),
        "speedup": round(rate(sims[best_k].tau, best_k, costs, draft_s) * costs.v0_s, 3),
    }


def calibrate(target: str, drafter_cfg, num_prompts: int, max_new_tokens: int, max_k: int) -> dict:
    from drafter_service.sorted import SortedProposerFactory
    from shared.config import default_config
    from shared.loading import load_model, set_num_threads, tokenizer_hash
    from verifier_service.engine import load_target
    from verifier_service.loop import SpecDecodeLoop

    set_num_threads(1)
    config = default_config()
    target_cfg = config.target(target)
    drafter_name = drafter_cfg.name
    if tokenizer_hash(drafter_cfg.model_dir) != tokenizer_hash(target_cfg.model_dir):
        raise SystemExit(f"{drafter_name!r} and {target!r} do not share a tokenizer")
    t_start = time.perf_counter()
    engine, tokenizer = load_target(target_cfg)
    loop = SpecDecodeLoop(engine, tokenizer, config.speculation)
    factory = SortedProposerFactory(drafter_cfg)
    exits = factory.exits
    drafter_model = load_model(drafter_cfg.model_copy(update={"dtype": "float32"}))

    prompts = load_calibration_prompts(tokenizer, num_prompts, max_new_tokens)
    logger.info("%s: %d prompts, greedy continuations of %d tokens", target, len(prompts), max_new_tokens)
    continuations = target_continuations(loop, prompts, max_new_tokens)
    seqs = exit_views(drafter_model, exits, prompts, continuations)
    v0, verify_ratio = measure_target_costs(engine, prompts, max_k)
    costs = Costs(v0, verify_ratio)
    cost_seqs = seqs[: min(len(seqs), 8)]
    vectors = grid_vectors(len(exits))
    measured = {tuple(v): measure_draft_cost(factory, cost_seqs, dict(zip(exits[:-1], v)), reps=2)
                for v in vectors}  # fmt: skip
    draft_s = {v: c for v, (c, _) in measured.items()}
    fixed = {e: tuple(fixed_exit_vector(exits, e)[x] for x in exits[:-1]) for e in exits}
    logger.info(
        "%s: v0 %.2f ms, verify(k)/v0 %s, draft ms/token per fixed exit %s (%d vectors measured)",
        target, 1e3 * v0, [round(r, 2) for r in verify_ratio],
        [round(1e3 * draft_s[fixed[e]], 3) for e in exits], len(vectors),
    )  # fmt: skip

    picks = best_vectors(seqs, draft_s, costs, COST_SCALES, max_k)
    logger.info("%s: picks %s", target, picks)
    arms, seen = [], set()
    named = [(name, tuple(v)) for name, (v, _, _) in picks.items()]
    named += [(f"exit{e}", fixed[e]) for e in exits]
    for name, v in named:
        if v not in seen:
            seen.add(v)
            c, mean_exit = measured[v]
            arms.append(arm_entry(name, exits, list(v), seqs, costs, c, mean_exit, max_k))
    # the start: the best arm once its drafting cost is measured, not modelled
    start = max(range(len(arms)), key=lambda i: arms[i]["speedup"])
    arms.insert(0, arms.pop(start))
    per_exit = {
        str(e): {
            "match": round(float(np.mean(np.concatenate([s.match[i, 1:] for s in seqs]))), 4),
            "draft_ms_per_token": round(1e3 * draft_s[fixed[e]], 3),
        }
        for i, e in enumerate(exits)
    }
    return {
        "drafter": drafter_name,
        "thresholds": arms[0]["thresholds"],
        "num_speculative_tokens": arms[0]["best_k"],
        "arms": arms,
        "per_exit": per_exit,
        "target_step_ms": round(1e3 * v0, 3),
        "verify_ratio": [round(r, 3) for r in verify_ratio],
        # every grid vector: "θ_1,θ_2" -> [drafting ms per draft token, τ at the arm k]
        "grid": {
            ",".join(f"{t:g}" for t in v): [
                round(1e3 * c, 3), round(simulate(seqs, list(v), arms[0]["best_k"]).tau, 3)
            ]
            for v, c in draft_s.items()
        },
        "num_prompts": len(prompts),
        "num_draft_positions": int(sum(len(s.continuation) - 1 for s in seqs)),
        "max_new_tokens": max_new_tokens,
        "prompts": f"train_prompts/code_prompts.jsonl, seed-0 shuffle from index {PROMPT_SKIP}, "
        f"last {MAX_PROMPT_TOKENS} tokens",
        "command": "python -m verifier_service.calibrate " + " ".join(sys.argv[1:]),
        "minutes": round((time.perf_counter() - t_start) / 60, 1),
    }


def write_entry(path: Path, target: str, entry: dict) -> None:
    """Replace one target's entry (other targets kept; a corrupt file is replaced)."""
    data = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            logger.warning("%s is not JSON: rewritten", path)
    data[target] = entry
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    from shared.config import default_config
    from shared.serving import configure_logging

    p = argparse.ArgumentParser(
        prog="python -m verifier_service.calibrate", description=__doc__.splitlines()[0]
    )
    p.add_argument("--target", required=True, help="target name from the config")
    p.add_argument("--drafter", default="codelm-sorted", help="sorted drafter name from the config")
    p.add_argument("--drafter-dir", type=Path,
                   help="a sorted drafter directory outside the config (e.g. one tuned for this "
                   "target alone); its calibration.json is written there")  # fmt: skip
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-k", type=int, default=None, help="default: the config's max_speculative_tokens")
    p.add_argument("--output", type=Path, help=f"default: <drafter dir>/{CALIBRATION_FILE}")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    configure_logging(args.log_level)
    config = default_config()
    max_k = args.max_k or config.speculation.max_speculative_tokens
    if args.drafter_dir is not None:
        from shared.config import DrafterConfig

        drafter = DrafterConfig(name=args.drafter_dir.name, model_dir=args.drafter_dir, kind="sorted")
    else:
        drafter = next((d for d in config.drafters if d.name == args.drafter), None)
        if drafter is None or drafter.kind != "sorted":
            raise SystemExit(f"{args.drafter!r} is not a sorted drafter of the config")
    entry = calibrate(args.target, drafter, args.num_prompts, args.max_new_tokens, max_k)
    path = args.output or Path(drafter.model_dir) / CALIBRATION_FILE
    write_entry(path, args.target, entry)
    print(json.dumps({args.target: {k: entry[k] for k in ("thresholds", "num_speculative_tokens")}}))
    for arm in entry["arms"]:
        print(f"  {arm['name']:>15}: thresholds {arm['thresholds']} k {arm['best_k']} tau {arm['tau']} "
              f"speedup {arm['speedup']} draft {arm['draft_ms_per_token']} ms/token")  # fmt: skip
    print(f"written to {path}")


if __name__ == "__main__":
    main()
