"""Exit thresholds of a nested (`sorted`, S2D) drafter, chosen per target from measured
acceptance, together with k.

A nested drafter's threshold vector θ (one confidence threshold per non-deepest exit) trades
acceptance for drafting cost: low thresholds let tokens leave at shallow, cheap exits that
the target accepts less often. Which trade pays depends on the target (how well each exit
matches it) and on the machine (drafting cost relative to a target step), so the verifier
of each target learns it, the same way `AdaptiveKPolicy` learns k.

`SortedExitPolicy` chooses among a few threshold vectors ("arms") by the tokens/s the k
policy's cost model predicts for each at its best k (`score(a) = max_k rate_a(k) · v0`, a
speedup over plain decoding; shared verify model v0, r_k). How it knows rate_a:

**Calibrated arms** (the target has an entry in `calibration.json`; the usual case): arm a's
acceptance and cost come from calibration, which measured every arm on the *same* text, and
online learning only moves what all arms share:

    α_{a,j} = σ(logit α^cal_{a,j} + δ + ε_a)     d_a = exp(log κ + η_a) · ρ^cal_a · v0

δ (the text's difficulty, in logits) and log κ (the machine's load on drafting) are fitted
by SGD on every round of the running arm (logistic loss per judged draft position, log
error of the drafting time), with ~10 rounds of memory, so each round re-ranks all arms on
the current text and load. Why not per-arm acceptance measured online: each arm would be
measured on different text (easy stretches make whichever arm ran there look best; seen on
the demo targets) and comparing them needs exploration that costs throughput. Arm-specific
calibration errors (ε_a, η_a) are identifiable only when another arm runs at the same δ, so
every `PROBE_EVERY` rounds one plausible other arm drafts a block of `MIN_STAY` rounds with
δ, κ frozen and only its own corrections learning.

**Uncalibrated arms** (no calibration for this target): a discounted-UCB bandit (Garivier &
Moulines 2011) over per-arm measured acceptance and cost:

    index(a)  = score(a) + c · sqrt(log(Σ_b n_b) / n_a),   n_a ← γ · n_a per round (+1 if run)

the discount makes an arm unseen for a while uncertain again, so it is re-checked.

In both modes a chosen arm drafts at least `MIN_STAY` rounds and another must score
`HYSTERESIS` better to take over, since a switch to deeper exits first fills those layers for
every position drafted shallower meanwhile (the drafter's lazy fill); that round is no cost
sample either. A per-exit threshold controller was rejected: acceptance of tokens that left
at exit e says nothing about what the same tokens would have scored deeper (the confident
ones leave early), so per-exit rates cannot tell whether a threshold should move.

Arms (all expressed as thresholds; `NEVER_EXIT` = 2.0 > any confidence, JSON-safe):
  - the calibrated vectors of this target (`verifier_service.calibrate`: optimal under the
    measured drafting/target cost ratio, and under half and twice that ratio), the first
    being the starting point; their priors are the calibrated α_j and cost ratio;
  - without calibration, the drafter's default thresholds (`sorted.json`) instead;
  - every fixed exit (all thresholds `NEVER_EXIT` below it, 0 at it), so the best fixed
    exit is always a candidate.

k is the running arm's: the k policy (`AdaptiveKPolicy`, shared verify model) drafts with
that arm's own short-memory `DraftStats` (α_j, drafting seconds per token), and on a switch
continues with the new arm's stats and its best k. Per-exit acceptance (decayed, of the
tokens the verifier judged: up to and including the first rejection) is kept for reporting
(`acceptance.exit<e>`).

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
class _Calibrated:
    """An arm as calibration saw it, plus slow corrections learned from its own rounds."""

    base_logit: list[float]  # [max_k] logit of the calibrated α_j
    cost_ratio: float  # calibrated drafting seconds per draft token over v0
    acceptance_corr: float = 0.0  # ε_a (logit)
    cost_corr: float = 0.0  # η_a (log)


@dataclass(slots=True)
class _Arm:
    spec: ArmSpec
    params: dict[str, float]  # set_params keys (one object per arm: the loop compares by identity)
    draft: DraftStats  # short memory (~20 rounds): k follows the text while the arm runs
    evidence: DraftStats  # long memory (~100 rounds): scores the arm against the others
    plays: float  # discounted number of speculative rounds it drafted
    calibrated: _Calibrated | None = None


def _logit(p: float) -> float:
    p = min(0.98, max(0.02, p))
    return math.log(p / (1.0 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@dataclass(slots=True)
class _ExitCounts:
    tried: dict[int, float] = field(default_factory=dict)  # decayed, per exit
    accepted: dict[int, float] = field(default_factory=dict)


class SortedExitPolicy:
    """k and the exit thresholds of one target's sorted drafter (see the module docstring)."""

    GAMMA = 0.98  # discount of every arm's play count per speculative round
    EXPLORE = 0.1  # c: exploration weight, in units of speedup over plain decoding
    CALIBRATED_PRIOR_WEIGHT = 8.0  # calibrated α_j count as this many rounds of evidence
    INITIAL_PLAYS = 2.0  # calibrated arms start as if run twice (uncalibrated: 0 = untried)
    MIN_STAY = 4  # speculative rounds an arm keeps drafting once chosen (amortises catch-up)
    HYSTERESIS = 0.01  # another arm must score this much (relative) better to take over
    LEVEL_RATE = 0.15  # SGD step of the shared levels δ, log κ (~10 rounds of memory)
    CORRECTION_RATE = 0.05  # SGD step of a probed arm's corrections ε_a, η_a
    PROBE_EVERY = 64  # calibrated mode: exploiting rounds between two probe blocks
    PROBE_MARGIN = 0.85  # ... of arms the model scores at least this share of the running one
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

            calibrated = None
            if spec.acceptance and spec.draft_cost_ratio is not None:
                rates = [spec.acceptance[min(j, len(spec.acceptance) - 1)] for j in range(max_k)]
                calibrated = _Calibrated([_logit(a) for a in rates], float(spec.draft_cost_ratio))
            self.arms.append(
                _Arm(spec, threshold_params(spec.thresholds), stats(0.95), stats(self.EVIDENCE_DECAY),
                     plays, calibrated)  # fmt: skip
            )
        # every arm calibrated: score with the shared-level model (no exploration needed)
        self.model_based = bool(self.arms) and all(a.calibrated is not None for a in self.arms)
        self.acceptance_level = 0.0  # δ: shared logit offset (the text's difficulty)
        self.cost_level = 0.0  # log κ: shared log cost scale (the machine's load on drafting)
        self._probing = False  # the current block probes a non-best arm (calibrated mode)
        self._since_probe = 0  # exploiting speculative rounds since the last probe block
        self._next_probe = 0  # round-robin position over the arms
        self.current = 0
        self._stay = 0  # rounds the current arm has drafted since it was chosen
        self.kpolicy = AdaptiveKPolicy(initial_k, max_k, draft=self.arms[0].draft)
        if setup.verify_ratio:
            self.kpolicy.seed_verify_ratios(setup.verify_ratio)
        self.exit_counts = _ExitCounts()
        self.num_switches = 0  # this request

    def fork(self) -> SortedExitPolicy:
        """A new request's policy that starts from what this one learned."""
        child = copy.deepcopy(self)  # one copy: the k policy keeps drafting with its arm's stats
        kp = child.kpolicy
        # as AdaptiveKPolicy.fork: a request inheriting "speculation off" probes at once
        kp._rounds_since_probe = kp.probe_every if kp.k == 0 else 0
        kp.num_off_rounds = 0
        child.num_switches = 0
        return child

    # ------------------------------------------------------------------ choice

    def scores(self) -> list[tuple[float, int]]:
        """(predicted speedup over plain decoding, its k) per arm."""
        if not self.model_based:
            return [self.kpolicy.best_speedup(arm.evidence) for arm in self.arms]
        kp = self.kpolicy
        v0 = kp.plain_step_s or 1.0
        out = []
        for arm in self.arms:
            c = arm.calibrated
            offset = self.acceptance_level + c.acceptance_corr
            alphas = [min(0.99, _sigmoid(b + offset)) for b in c.base_logit]
            draft_s = math.exp(self.cost_level + c.cost_corr) * c.cost_ratio * v0
            rates = kp.rates_for(alphas, draft_s)
            k = max(range(len(rates)), key=rates.__getitem__)
            out.append((rates[k] * v0, k))
        return out

    def _learn_levels(self, k: int, num_accepted: int, draft_time_s: float | None) -> None:
        """One round's evidence (logistic SGD on each judged position, log-cost SGD on the
        drafting time): while exploiting it moves the shared levels δ, log κ (the running
        arm is the anchor); while probing another arm it moves only that arm's corrections
        ε_a, η_a at the level the anchor just set (text and load barely change in a few
        rounds), which is what makes arm-specific errors identifiable at all."""
        c = self.arms[self.current].calibrated
        rate = self.CORRECTION_RATE if self._probing else self.LEVEL_RATE
        for j in range(min(k, num_accepted + 1, len(c.base_logit))):
            y = 1.0 if j < num_accepted else 0.0
            g = y - _sigmoid(c.base_logit[j] + self.acceptance_level + c.acceptance_corr)
            if self._probing:
                c.acceptance_corr += rate * g
            else:
                self.acceptance_level += rate * g
        v0 = self.kpolicy.plain_step_s
        if draft_time_s is not None and draft_time_s > 0 and v0:
            predicted = math.exp(self.cost_level + c.cost_corr) * c.cost_ratio
            r = math.log(draft_time_s / k / v0) - math.log(max(predicted, 1e-9))
            if self._probing:
                c.cost_corr += rate * r
            else:
                self.cost_level += rate * r

    def _index(self, score: float, plays: float, total: float) -> float:
        if plays <= 1e-9:
            return math.inf  # never tried: try it
        return score + self.EXPLORE * math.sqrt(math.log(max(total, math.e)) / plays)

    def _choose(self) -> tuple[int, int]:
        """(arm with the highest index, its best k): the model's score (calibrated), else
        the D-UCB index; the running arm keeps drafting unless another beats it by
        `HYSTERESIS` (a switch to deeper exits costs a catch-up fill)."""
        scores = self.scores()
        if self.model_based:
            index = [score for score, _ in scores]
        else:
            total = sum(arm.plays for arm in self.arms)
            index = [self._index(score, arm.plays, total) for arm, (score, _) in zip(self.arms, scores)]
        best = max(range(len(index)), key=index.__getitem__)
        if index[best] <= index[self.current] * (1.0 + self.HYSTERESIS):
            best = self.current
        return best, scores[best][1]

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
        if k > 0 and self._stay == 0 and self.num_switches:
            # NOTE: the first round after a switch to deeper exits also ran those layers over
            # every position drafted shallower since they last ran (lazy fill): a one-off
            # catch-up, not this vector's per-token cost
            draft_time_s = None
        kp.update(k, num_accepted, draft_time_s, verify_time_s)  # the current arm's draft stats
        if k == 0:
            return
        self.arms[self.current].evidence.observe(k, num_accepted, draft_time_s)
        if self.model_based:
            self._learn_levels(k, num_accepted, draft_time_s)
        if exit_layers:
            self._count_exits(exit_layers[:k], num_accepted)
        for arm in self.arms:
            arm.plays *= self.GAMMA
        self.arms[self.current].plays += 1.0
        self._stay += 1
        if not self._probing:
            self._since_probe += 1
        if kp.warming_up or self._stay < self.MIN_STAY:
            return  # the k warm-up (±2/−1) runs on the starting vector; switches come in blocks
        if self.model_based and not self._probing and self._since_probe >= self.PROBE_EVERY:
            self._start_probe()
            return
        self._probing = False
        best, best_k = self._choose()
        if best != self.current:
            self._switch(best, best_k)

    def _switch(self, arm: int, k: int) -> None:
        self.current = arm
        self._stay = 0
        self.num_switches += 1
        self.kpolicy.draft = self.arms[arm].draft
        self.kpolicy.k = k

    def _start_probe(self) -> None:
        """Calibrated mode: the next arm in turn drafts one block (MIN_STAY rounds); arms
        the model scores far below the running one are not worth a block."""
        scores = self.scores()
        floor = self.PROBE_MARGIN * scores[self.current][0]
        others = [i for i in range(len(self.arms)) if i != self.current and scores[i][0] >= floor]
        self._since_probe = 0
        if not others:
            return
        arm = others[self._next_probe % len(others)]
        self._next_probe += 1
        self._probing = True
        self._switch(arm, self.scores()[arm][1])

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
        if self.model_based:
            out["acceptance_level"] = self.acceptance_level
            out["draft_cost_level"] = self.cost_level
        return out

    @property
    def current_arm(self) -> str:
        return self.arms[self.current].spec.name
