"""How many draft tokens to ask for each round (the verifier owns k; k = 0 allowed).

Every policy answers, per round: `params()` (drafter parameters for `Proposer.set_params`;
the same object until they change, empty for k-only policies), `next_k()`, then
`update(k, num_accepted, draft_time_s, verify_time_s, exit_layers)` and, at the end,
`summary()` (what it chose, for `SpecStats.policy`). `draft_time_s` is None for a round
whose drafting included catching up on context the drafter had not seen (the first
speculative round of a request: the drafter's prompt prefill, ~15 ms for a 150-token
prompt; the first after k = 0 rounds): charged to its k draft tokens it would make
drafting look several times dearer than it is and switch speculation off. The exit
thresholds of nested drafters are chosen by `exit_policy.SortedExitPolicy`, which drives
an `AdaptiveKPolicy` for k.

`AdaptiveKPolicy` starts from Hugging Face assisted generation's ±2/−1 rule (all drafts
accepted → k += 2, else k −= 1) for its first rounds, then picks the k that maximises
expected tokens per second under a cost model fitted online from the loop's own timings:

    tokens(k) = 1 + α₁ + α₁α₂ + … + α₁⋯α_k     (α_j: decayed acceptance rate of position j
                                               given j − 1 accepted; acceptance is bursty, so
                                               α_j grows with j and one α would undersell k)
    time(k)   = verify(k) + draft(k)
    verify(k) = v0 · r_k                       (v0: a k = 0 step; r_k: EMA of verify / v0 for
                                               rounds with k drafts, prior 1 + β₀·k, monotone)
    draft(k)  = d · k                          (d: EMA of drafting seconds per draft token)

k = 0 (plain decoding, tokens/time = 1/v0) wins whenever speculation does not pay, so
speculation turns itself off. While off, it probes k = 1 every `probe_every` rounds so it
notices when the drafts get better; while on, it runs one k = 0 round every `probe_every`
rounds to keep v0 measured under the current machine load.

The loop keeps the last finished request's policy per method and forks it for the next
request, so what one request learned about a target/drafter pair carries over (a 64-token
request is too short to warm up from nothing), while each request still adapts to its own
text (a loop accepts everything, fresh code much less).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field


NO_PARAMS: dict[str, float] = {}  # k-only policies ask the drafter for nothing (never mutated)


@dataclass(slots=True)
class _Ema:
    alpha: float = 0.15
    value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)

    def get(self, default: float) -> float:
        return default if self.value is None else self.value


def plus_two_minus_one(k: int, num_accepted: int, max_k: int) -> int:
    """HF assisted generation's heuristic: all drafts accepted → k + 2, else k − 1 (floor 1)."""
    return min(max_k, k + 2) if num_accepted == k else max(1, k - 1)


class HeuristicKPolicy:
    """The ±2/−1 rule alone, for seeded sampled requests.

    NOTE: with rejection sampling the tokens a seed produces depend on the k of every
    round (k decides which uniforms and draft draws are consumed where). The cost-model
    policy reads wall-clock timings, so it would make a seeded request irreproducible;
    this rule depends only on acceptance, which the seed itself determines.
    """

    def __init__(self, initial_k: int, max_k: int) -> None:
        self.k = max(1, min(initial_k, max_k)) if max_k > 0 else 0
        self.max_k = max_k

    def params(self) -> dict[str, float]:
        return NO_PARAMS

    def next_k(self) -> int:
        return self.k

    def update(
        self, k: int, num_accepted: int, draft_time_s: float, verify_time_s: float, exit_layers=None
    ) -> None:
        if k > 0:
            self.k = plus_two_minus_one(k, num_accepted, self.max_k)

    def summary(self) -> dict[str, float]:
        return {"k": float(self.k), "adaptive": 1.0, "seeded": 1.0}


class FixedKPolicy:
    """Always k (the request asked for a fixed num_speculative_tokens)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def params(self) -> dict[str, float]:
        return NO_PARAMS

    def next_k(self) -> int:
        return self.k

    def update(
        self, k: int, num_accepted: int, draft_time_s: float, verify_time_s: float, exit_layers=None
    ) -> None:
        pass

    def summary(self) -> dict[str, float]:
        return {"k": float(self.k), "adaptive": 0.0}


@dataclass(slots=True)
class DraftStats:
    """What the cost model knows about one way of drafting (a drafter, or one exit-threshold
    vector of a nested drafter): decayed per-position acceptance and drafting cost.

    `tried[j]` / `accepted[j]`: decayed counts of rounds whose draft reached position j + 1
    (all earlier accepted) and of those that accepted it, so `accepted[j] / tried[j]` = α_{j+1}.
    """

    tried: list[float]  # [max_k]
    accepted: list[float]  # [max_k]
    draft_per_token: _Ema = field(default_factory=_Ema)  # d, seconds per draft token
    # prior for d before any measurement, as a multiple of v0 (None: 0, drafting is free)
    draft_cost_ratio: float | None = None
    num_rounds: int = 0  # speculative rounds observed (not decayed)
    decay: float = 0.95  # per observed round: ~20 rounds of memory (follows the text)

    PRIOR_WEIGHT = 1.0
    MIN_EVIDENCE = 2.0  # decayed tries before a position's own rate is trusted

    @classmethod
    def prior(
        cls,
        max_k: int,
        acceptance: float | list[float] = 0.6,
        weight: float = PRIOR_WEIGHT,
        draft_cost_ratio: float | None = None,
        decay: float = 0.95,
    ) -> DraftStats:
        """As if `weight` rounds had reached every position and accepted at `acceptance`
        (one rate, or α_j per position: the last one repeats)."""
        rates = [acceptance] * max_k if isinstance(acceptance, float | int) else list(acceptance)
        rates = [rates[min(j, len(rates) - 1)] for j in range(max_k)] if rates else [0.6] * max_k
        return cls(
            tried=[weight] * max_k,
            accepted=[weight * a for a in rates],
            draft_cost_ratio=draft_cost_ratio,
            decay=decay,
        )

    def acceptance(self, position: int) -> float:
        """α_j for draft position j = position + 1 (positions never reached: the deepest seen)."""
        j = min(position, len(self.tried) - 1)
        while j > 0 and self.tried[j] < self.MIN_EVIDENCE:
            j -= 1  # too little evidence here: extrapolate from the deepest position tried
        return min(0.99, self.accepted[j] / self.tried[j])

    def acceptances(self) -> list[float]:
        """[α_1 .. α_max_k] in one pass (same values as `acceptance(j)` for each j)."""
        out, trusted = [], 0
        for j, tried in enumerate(self.tried):
            if j == 0 or tried >= self.MIN_EVIDENCE:
                trusted = j
            out.append(min(0.99, self.accepted[trusted] / self.tried[trusted]))
        return out

    def draft_seconds(self, v0: float | None) -> float:
        """d: measured, else the prior ratio times the plain step (else 0)."""
        if self.draft_per_token.value is not None:
            return self.draft_per_token.value
        if self.draft_cost_ratio is not None and v0:
            return self.draft_cost_ratio * v0
        return 0.0

    def observe(self, k: int, num_accepted: int, draft_time_s: float | None) -> None:
        """One speculative round (k > 0) drafted this way (`draft_time_s` None: the round's
        drafting time is not representative, e.g. the drafter caught up on a prompt)."""
        self.num_rounds += 1
        for j in range(len(self.tried)):
            self.tried[j] *= self.decay
            self.accepted[j] *= self.decay
        for j in range(min(k, num_accepted + 1, len(self.tried))):
            self.tried[j] += 1.0
        for j in range(min(num_accepted, len(self.tried))):
            self.accepted[j] += 1.0
        if draft_time_s is not None:
            self.draft_per_token.add(draft_time_s / k)


class AdaptiveKPolicy:
    WARMUP_ROUNDS = 4
    PRIOR_ACCEPTANCE = 0.6
    PRIOR_VERIFY_SLOPE = 0.08

    def __init__(
        self, initial_k: int, max_k: int, probe_every: int = 16, draft: DraftStats | None = None
    ) -> None:
        self.max_k = max_k
        self.k = max(1, min(initial_k, max_k)) if max_k > 0 else 0
        self.probe_every = probe_every
        self._num_spec_rounds = 0
        self._rounds_since_probe = 0
        # the drafting side of the cost model (swapped by the exit policy per threshold vector)
        self.draft = draft if draft is not None else DraftStats.prior(max_k, self.PRIOR_ACCEPTANCE)
        self._plain_step = _Ema()  # v0
        # verify(k) / v0 per k (index k): measured, not a line: on CPU the first extra token
        # costs far more than the next ones (HF builds a causal mask once q_len > 1)
        self._verify_ratio = [_Ema() for _ in range(max_k + 1)]
        self.num_off_rounds = 0

    def fork(self) -> AdaptiveKPolicy:
        """A new request's policy that starts from what this one learned (no warm-up)."""
        child = copy.deepcopy(self)
        # A request that inherits "speculation off" probes at once: its text may suit the
        # drafter better than the last one's, and a short request would never reach a probe.
        child._rounds_since_probe = child.probe_every if child.k == 0 else 0
        child.num_off_rounds = 0
        return child

    # ------------------------------------------------------------------ model

    @property
    def plain_step_s(self) -> float | None:
        """v0: the measured seconds of a k = 0 round (None before the first)."""
        return self._plain_step.value

    @property
    def warming_up(self) -> bool:
        return self._plain_step.value is None or self._num_spec_rounds <= self.WARMUP_ROUNDS

    def acceptance(self, position: int) -> float:
        """α_j for draft position j = position + 1 (positions never reached: the deepest seen)."""
        return self.draft.acceptance(position)

    def expected_rates(self, draft: DraftStats | None = None) -> list[float]:
        """Expected tokens per second for k = 0 .. max_k (relative units before v0 is known),
        drafting as `draft` says (default: the current drafting stats); one pass."""
        draft = draft if draft is not None else self.draft
        return self.rates_for(draft.acceptances(), draft.draft_seconds(self._plain_step.value))

    def rates_for(self, acceptances: Sequence[float], draft_s: float) -> list[float]:
        """Expected tokens per second for k = 0 .. max_k given α_1.. and drafting seconds
        per draft token (the shared verify model: v0, r_k)."""
        v0 = self._plain_step.get(1.0)
        ratios = self.verify_ratios()
        rates = [1.0 / v0]
        tokens, reach = 1.0, 1.0
        for k, alpha in enumerate(acceptances[: self.max_k], start=1):
            reach *= alpha
            tokens += reach
            rates.append(tokens / (v0 * ratios[k] + draft_s * k))
        return rates

    def seed_verify_ratios(self, ratios: Sequence[float]) -> None:
        """Start verify(k) / v0 from measured values (calibration; index k), not the prior."""
        for k in range(1, min(len(ratios), self.max_k + 1)):
            self._verify_ratio[k].value = float(ratios[k])

    def verify_ratios(self) -> list[float]:
        """verify(k) / v0 for k = 0 .. max_k: measured where k ran, else the prior line
        1 + β₀·k, never below a smaller k's (a longer verify is not cheaper). Unmeasured k
        look cheap, so the policy tries them and learns their real cost."""
        out, floor = [1.0], 1.0
        for k in range(1, self.max_k + 1):
            measured = self._verify_ratio[k].value
            r = measured if measured is not None else 1.0 + self.PRIOR_VERIFY_SLOPE * k
            floor = max(floor, r)
            out.append(floor)
        return out

    def expected_rate(self, k: int, draft: DraftStats | None = None) -> float:
        """Expected tokens per second with k drafts per round (see `expected_rates`)."""
        return self.expected_rates(draft)[k]

    def best_k(self, draft: DraftStats | None = None) -> int:
        rates = self.expected_rates(draft)
        return max(range(len(rates)), key=rates.__getitem__)

    def best_speedup(self, draft: DraftStats | None = None) -> tuple[float, int]:
        """(expected rate at the best k over plain decoding's 1 / v0, that k): unitless."""
        rates = self.expected_rates(draft)
        k = max(range(len(rates)), key=rates.__getitem__)
        return rates[k] * self._plain_step.get(1.0), k

    # ------------------------------------------------------------------ policy

    def params(self) -> dict[str, float]:
        return NO_PARAMS  # k only; nothing for the drafter

    def next_k(self) -> int:
        if self.max_k == 0:
            return 0
        self._rounds_since_probe += 1
        if self._plain_step.value is None or (self.k > 0 and self._rounds_since_probe > self.probe_every):
            return 0  # measure v0 (an ordinary step, never wasted)
        if self.k == 0 and self._rounds_since_probe > self.probe_every:
            return 1  # speculation is off: probe whether it pays again
        return self.k

    def update(
        self,
        k: int,
        num_accepted: int,
        draft_time_s: float | None,
        verify_time_s: float,
        exit_layers: Sequence[int] | None = None,
    ) -> None:
        if k == 0:
            self._plain_step.add(verify_time_s)
            if self.k == 0:
                self.num_off_rounds += 1
            else:
                self._rounds_since_probe = 0
            return
        if self.k == 0:
            self._rounds_since_probe = 0  # a probe round
        self._num_spec_rounds += 1
        self.draft.observe(k, num_accepted, draft_time_s)
        v0 = self._plain_step.value
        if v0 and k < len(self._verify_ratio):
            self._verify_ratio[k].add(verify_time_s / v0)
        if self._num_spec_rounds <= self.WARMUP_ROUNDS:
            self.k = plus_two_minus_one(k, num_accepted, self.max_k)  # until the model has data
        else:
            self.k = self.best_k()

    def summary(self) -> dict[str, float]:
        return {
            "k": float(self.k),
            "adaptive": 1.0,
            "acceptance_pos1": self.acceptance(0) if self.max_k else 0.0,
            "num_off_rounds": float(self.num_off_rounds),
        }


class ParamsPolicy:
    """A k policy plus drafter parameters that stay fixed for the whole request (a seeded
    sampled request, a fixed k, or parameters the request itself pinned)."""

    def __init__(self, kpolicy, params: dict[str, float]) -> None:
        self.kpolicy = kpolicy
        self._params = dict(params)

    def params(self) -> dict[str, float]:
        return self._params

    def next_k(self) -> int:
        return self.kpolicy.next_k()

    def update(self, k, num_accepted, draft_time_s, verify_time_s, exit_layers=None) -> None:
        self.kpolicy.update(k, num_accepted, draft_time_s, verify_time_s)

    def summary(self) -> dict[str, float]:
        return {**self.kpolicy.summary(), **self._params}
