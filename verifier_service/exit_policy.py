"""Exit thresholds of a nested (`sorted`, S2D) drafter, chosen per target from measured
acceptance, together with k.

A nested drafter's threshold vector θ (one confidence threshold per non-deepest exit) trades
acceptance for drafting cost: low thresholds let tokens leave at shallow, cheap exits that
the target accepts less often. Which trade pays depends on the target (how well each exit
matches it) and on the machine (drafting cost relative to a target step), so the verifier
of each target learns it, the same way `AdaptiveKPolicy` learns k.

`SortedExitPolicy` is a small **discounted-UCB bandit over a few threshold vectors** ("arms"),
each scored by the tokens/s the k policy's cost model predicts for it at its best k:

    score(a)  = max_k rate_a(k) · v0               (speedup over plain decoding; rate_a from
                                                    arm a's own per-position acceptance α_j and
                                                    drafting seconds per token, shared v0, β)
    index(a)  = score(a) + c · sqrt(log(Σ_b n_b) / n_a)
    n_a       ← γ · n_a every speculative round, + 1 for the arm that ran it

and after each speculative round the arm with the highest index drafts the next one
(D-UCB, Garivier & Moulines 2011: the discount γ makes an arm that has not run for a while
look uncertain again, so the policy re-checks it and follows drift, e.g. in machine load).
Why this and not a per-exit threshold controller: acceptance of tokens that left at exit e
says nothing about what the same tokens would have scored deeper (the confident ones leave
early), so per-exit rates cannot tell whether a threshold should move; measured tokens/s
per vector can, and it is the objective itself. Because the exploration term shrinks with
evidence, a clearly worse arm costs a few rounds per ~30-80 (≈ 1 % of throughput).

Arms (all expressed as thresholds; `NEVER_EXIT` = 2.0 > any confidence, JSON-safe):
  - the calibrated vectors of this target (`verifier_service.calibrate`: optimal under the
    measured drafting/target cost ratio, and under half and twice that ratio), the first
    being the starting point; their priors are the calibrated α_j and cost ratio;
  - without calibration, the drafter's default thresholds (`sorted.json`) instead;
  - every fixed exit (all thresholds `NEVER_EXIT` below it, 0 at it), so the policy is never
    worse than the best fixed exit by more than its exploration.

Every arm has its own `DraftStats` (α_j, drafting seconds per token) and the k policy's
verify model (v0, β) is shared: on a switch the k policy continues with the new arm's stats
and that arm's best k. Per-exit acceptance (decayed: tokens the verifier judged, i.e. up to
and including the first rejection) is kept for reporting (`acceptance.exit<e>`).

Learning carries across requests like `AdaptiveKPolicy` (the loop forks the last finished
request's policy). Seeded sampled requests keep the starting vector (`ParamsPolicy`), since
a choice driven by timings would make the seed irreproducible.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from verifier_service.policy import AdaptiveKPolicy, DraftStats

logger = logging.getLogger(__name__)

NEVER_EXIT = 2.0  # a threshold above any confidence (top probability <= 1): never leave here
CALIBRATION_FILE = "calibration.json"
SORTED_CONFIG_FILE = "sorted.json"


def threshold_params(thresholds: dict[int, float]) -> dict[str, float]:
    """`set_params` keys for a threshold vector."""
    return {f"threshold.{e}": float(t) for e, t in sorted(thresholds.items())}


def fixed_exit_vector(exits: Sequence[int], exit_layer: int) -> dict[int, float]:
    """Thresholds (every non-deepest exit) under which every token leaves at `exit_layer`."""
    if exit_layer not in exits:
        raise ValueError(f"exit {exit_layer} is not one of {list(exits)}")
    return {e: (0.0 if e == exit_layer else NEVER_EXIT) for e in exits[:-1]}


@dataclass(frozen=True, slots=True)
class ArmSpec:
    """One candidate threshold vector and what calibration knows about it."""

    name: str
    thresholds: dict[int, float]  # every non-deepest exit
    acceptance: tuple[float, ...] | None = None  # calibrated α_j, j = 1 .. (None: unknown)
    draft_cost_ratio: float | None = None  # calibrated drafting s/token over a target step


@dataclass(slots=True)
class ExitSetup:
    """What the verifier of one target knows at start-up about the sorted drafter."""

    exits: list[int]
    arms: list[ArmSpec]  # [0] = the starting vector
    initial_k: int | None = None  # calibrated k, None: the config's default
    source: str = "drafter defaults"  # or the calibration file
    verify_ratio: list[float] | None = None  # calibrated verify(k) / v0, index k

    @property
    def start_params(self) -> dict[str, float]:
        return threshold_params(self.arms[0].thresholds)


def default_setup(exits: Sequence[int], default_thresholds: dict[int, float]) -> ExitSetup:
    """Arms without calibration: the drafter's defaults first, then each fixed exit."""
    exits = list(exits)
    start = {e: float(default_thresholds.get(e, NEVER_EXIT)) for e in exits[:-1]}
    arms = [ArmSpec("default", start)]
    arms += [ArmSpec(f"exit{e}", fixed_exit_vector(exits, e)) for e in exits]
    return ExitSetup(exits=exits, arms=_dedupe(arms))


def _dedupe(arms: list[ArmSpec]) -> list[ArmSpec]:
    seen, out = set(), []
    for arm in arms:
        key = tuple(sorted(arm.thresholds.items()))
        if key not in seen:
            seen.add(key)
            out.append(arm)
    return out


def load_exit_setup(drafter_dir: str | Path, target: str) -> ExitSetup | None:
    """The setup for `target` from a sorted drafter directory: `calibration.json`'s entry
    for the target when there is one, else the defaults of `sorted.json`. None (with a log
    line) when the directory is not readable here: the drafter then uses its own defaults
    and only k adapts. A corrupt calibration entry falls back to the defaults."""
    drafter_dir = Path(drafter_dir)
    try:
        sorted_cfg = json.loads((drafter_dir / SORTED_CONFIG_FILE).read_text())
        exits = [int(e) for e in sorted_cfg["exits"]]
        defaults = {int(e): float(t) for e, t in (sorted_cfg.get("thresholds") or {}).items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("no exit policy for %s: cannot read %s (%s)", target, drafter_dir, e)
        return None
    setup = default_setup(exits, defaults)
    path = drafter_dir / CALIBRATION_FILE
    if not path.is_file():
        return setup
    try:
        entry = json.loads(path.read_text()).get(target)
        if entry is None:
            logger.info("%s has no calibration for %s: drafter defaults", path, target)
            return setup
        return setup_from_calibration(exits, entry, source=str(path))
    except (ValueError, KeyError, TypeError) as e:
        logger.warning("ignoring calibration of %s in %s: %s", target, path, e)
        return setup


def setup_from_calibration(exits: Sequence[int], entry: dict, source: str = "") -> ExitSetup:
    """Arms from one target's calibration entry, then the fixed exits (deduplicated)."""
    exits = list(exits)
    arms = []
    for arm in entry["arms"]:
        thresholds = {int(e): float(t) for e, t in arm["thresholds"].items()}
        if sorted(thresholds) != exits[:-1]:
            raise ValueError(f"arm {arm.get('name')!r} has thresholds for {sorted(thresholds)}")
        acceptance = arm.get("acceptance")
        arms.append(
            ArmSpec(
                name=str(arm["name"]),
                thresholds=thresholds,
                acceptance=tuple(float(a) for a in acceptance) if acceptance else None,
                draft_cost_ratio=arm.get("draft_cost_ratio"),
            )
        )
    if not arms:
        raise ValueError("no arms")
    names = {a.name for a in arms}
    arms += [
        ArmSpec(f"exit{e}", fixed_exit_vector(exits, e)) for e in exits if f"exit{e}" not in names
    ]
    k = entry.get("num_speculative_tokens")
    ratios = entry.get("verify_ratio")
    return ExitSetup(
        exits=exits, arms=_dedupe(arms), initial_k=int(k) if k else None,
        source=source or "calibration",
        verify_ratio=[float(r) for r in ratios] if ratios else None,
    )  # fmt: skip


@dataclass(slots=True)
class _Arm:
    spec: ArmSpec
    params: dict[str, float]  # set_params keys (one object per arm: the loop compares by identity)
    draft: DraftStats  # short memory (~20 rounds): k follows the text while the arm runs
    evidence: DraftStats  # long memory (~100 rounds): scores the arm against the others
    plays: float  # discounted number of speculative rounds it drafted


@dataclass(slots=True)
class _ExitCounts:
    tried: dict[int, float] = field(default_factory=dict)  # decayed, per exit
    accepted: dict[int, float] = field(default_factory=dict)


class SortedExitPolicy:
    """k and the exit thresholds of one target's sorted drafter (see the module docstring)."""

    GAMMA = 0.98  # discount of every arm's play count per speculative round
    EXPLORE = 0.1  # c: exploration weight, in units of speedup over plain decoding
    CALIBRATED_PRIOR_WEIGHT = 4.0  # calibrated α_j count as this many rounds of evidence
    INITIAL_PLAYS = 1.0  # calibrated arms start as if run once (uncalibrated: 0 = untried)
    EXIT_DECAY = 0.98
    EVIDENCE_DECAY = 0.99  # per round of the arm: its score averages ~100 of its rounds

    def __init__(self, setup: ExitSetup, initial_k: int, max_k: int) -> None:
        self.exits = list(setup.exits)
        self.arms: list[_Arm] = []
        for spec in setup.arms:
            if spec.acceptance:
                acceptance, weight = list(spec.acceptance), self.CALIBRATED_PRIOR_WEIGHT
                plays = self.INITIAL_PLAYS
            else:
                acceptance, weight = AdaptiveKPolicy.PRIOR_ACCEPTANCE, DraftStats.PRIOR_WEIGHT
                plays = 0.0

            def stats(decay: float) -> DraftStats:
                return DraftStats.prior(max_k, acceptance, weight, spec.draft_cost_ratio, decay)

            self.arms.append(
                _Arm(spec, threshold_params(spec.thresholds), stats(0.95), stats(self.EVIDENCE_DECAY), plays)
            )
        self.current = 0
        self.kpolicy = AdaptiveKPolicy(initial_k, max_k, draft=self.arms[0].draft)
        if setup.verify_ratio:
            self.kpolicy.seed_verify_ratios(setup.verify_ratio)
        self.exit_counts = _ExitCounts()
        self.num_switches = 0  # this request

    def fork(self) -> SortedExitPolicy:
        """A new request's policy that starts from what this one learned."""
        child = copy.deepcopy(self)
        child.kpolicy._rounds_since_probe = 0
        child.kpolicy.num_off_rounds = 0
        child.num_switches = 0
        return child

    # ------------------------------------------------------------------ choice

    def scores(self) -> list[tuple[float, int]]:
        """(predicted speedup over plain decoding, its k) per arm."""
        return [self.kpolicy.best_speedup(arm.evidence) for arm in self.arms]

    def _index(self, score: float, plays: float, total: float) -> float:
        if plays <= 1e-9:
            return math.inf  # never tried: try it
        return score + self.EXPLORE * math.sqrt(math.log(max(total, math.e)) / plays)

    def _choose(self) -> tuple[int, int]:
        """(arm with the highest D-UCB index, its best k)."""
        total = sum(arm.plays for arm in self.arms)
        best, best_index, best_k = self.current, -math.inf, self.kpolicy.k
        for i, (arm, (score, k)) in enumerate(zip(self.arms, self.scores())):
            index = self._index(score, arm.plays, total)
            if index > best_index:
                best, best_index, best_k = i, index, k
        return best, best_k

    # ------------------------------------------------------------------ policy

    def params(self) -> dict[str, float]:
        return self.arms[self.current].params

    def next_k(self) -> int:
        return self.kpolicy.next_k()

    def update(
        self,
        k: int,
        num_accepted: int,
        draft_time_s: float | None,
        verify_time_s: float,
        exit_layers: Sequence[int] | None = None,
    ) -> None:
        kp = self.kpolicy
        kp.update(k, num_accepted, draft_time_s, verify_time_s)  # the current arm's draft stats
        if k == 0:
            return
        self.arms[self.current].evidence.observe(k, num_accepted, draft_time_s)
        if exit_layers:
            self._count_exits(exit_layers[:k], num_accepted)
        for arm in self.arms:
            arm.plays *= self.GAMMA
        self.arms[self.current].plays += 1.0
        if kp.warming_up:
            return  # the k warm-up (±2/−1) runs on the starting vector
        best, best_k = self._choose()
        if best != self.current:
            self.current = best
            self.num_switches += 1
            kp.draft = self.arms[best].draft
            kp.k = best_k

    def _count_exits(self, exit_layers: Sequence[int], num_accepted: int) -> None:
        c = self.exit_counts
        for e in c.tried:
            c.tried[e] *= self.EXIT_DECAY
            c.accepted[e] *= self.EXIT_DECAY
        # judged tokens: the accepted ones and the first rejected (later ones were not checked)
        for i, e in enumerate(exit_layers[: num_accepted + 1]):
            c.tried[e] = c.tried.get(e, 0.0) + 1.0
            c.accepted[e] = c.accepted.get(e, 0.0) + (1.0 if i < num_accepted else 0.0)

    def exit_acceptance(self) -> dict[int, float]:
        """Decayed acceptance of the judged tokens that left at each exit."""
        c = self.exit_counts
        return {e: c.accepted[e] / c.tried[e] for e in sorted(c.tried) if c.tried[e] > 0}

    def summary(self) -> dict[str, float]:
        arm = self.arms[self.current]
        out = {
            "k": float(self.kpolicy.k),
            "adaptive": 1.0,
            "arm": float(self.current),
            "num_arms": float(len(self.arms)),
            "num_arm_switches": float(self.num_switches),
            "acceptance_pos1": arm.draft.acceptance(0),
            "num_off_rounds": float(self.kpolicy.num_off_rounds),
            **arm.params,
        }
        for e, rate in self.exit_acceptance().items():
            out[f"acceptance.exit{e}"] = rate
        return out

    @property
    def current_arm(self) -> str:
        return self.arms[self.current].spec.name
