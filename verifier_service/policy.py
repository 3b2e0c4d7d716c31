"""How many draft tokens to ask for each round (the verifier owns k; k = 0 allowed).

`AdaptiveKPolicy` starts from Hugging Face assisted generation's ±2/−1 rule (all drafts
accepted → k += 2, else k −= 1) for its first rounds, then picks the k that maximises
expected tokens per second under a cost model fitted online from the loop's own timings:

    tokens(k) = 1 + α₁ + α₁α₂ + … + α₁⋯α_k     (α_j: decayed acceptance rate of position j
                                               given j − 1 accepted; acceptance is bursty, so
                                               α_j grows with j and one α would undersell k)
    time(k)   = verify(k) + draft(k)
    verify(k) = v0 · (1 + β·k)                 (v0: a k = 0 step; β: extra cost per verified token)
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
from dataclasses import dataclass


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

    def next_k(self) -> int:
        return self.k

    def update(self, k: int, num_accepted: int, draft_time_s: float, verify_time_s: float) -> None:
        if k > 0:
            self.k = plus_two_minus_one(k, num_accepted, self.max_k)

    def summary(self) -> dict[str, float]:
        return {"k": float(self.k), "adaptive": 1.0, "seeded": 1.0}


class FixedKPolicy:
    """Always k (the request asked for a fixed num_speculative_tokens)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def next_k(self) -> int:
        return self.k

    def update(self, k: int, num_accepted: int, draft_time_s: float, verify_time_s: float) -> None:
        pass

    def summary(self) -> dict[str, float]:
        return {"k": float(self.k), "adaptive": 0.0}


class AdaptiveKPolicy:
    WARMUP_ROUNDS = 4
    PRIOR_ACCEPTANCE = 0.6
    PRIOR_VERIFY_SLOPE = 0.08
    PRIOR_WEIGHT = 1.0
    DECAY = 0.95
    MIN_EVIDENCE = 2.0  # decayed tries before a position's own rate is trusted

    def __init__(self, initial_k: int, max_k: int, probe_every: int = 16) -> None:
        self.max_k = max_k
        self.k = max(1, min(initial_k, max_k)) if max_k > 0 else 0
        self.probe_every = probe_every
        self._num_spec_rounds = 0
        self._rounds_since_probe = 0
        # decayed counts per draft position j (index j - 1): tried = reached, accepted = passed
        self._tried = [self.PRIOR_WEIGHT] * max_k
        self._accepted = [self.PRIOR_WEIGHT * self.PRIOR_ACCEPTANCE] * max_k
        self._plain_step = _Ema()  # v0
        self._verify_slope = _Ema()  # β
        self._draft_per_token = _Ema()  # d
        self.num_off_rounds = 0

    def fork(self) -> AdaptiveKPolicy:
        """A new request's policy that starts from what this one learned (no warm-up)."""
        child = copy.deepcopy(self)
        child._rounds_since_probe = 0
        child.num_off_rounds = 0
        return child

    # ------------------------------------------------------------------ model

    def acceptance(self, position: int) -> float:
        """α_j for draft position j = position + 1 (positions never reached: the deepest seen)."""
        j = min(position, self.max_k - 1)
        while j > 0 and self._tried[j] < self.MIN_EVIDENCE:
            j -= 1  # too little evidence here: extrapolate from the deepest position tried
        return min(0.99, self._accepted[j] / self._tried[j])

    def expected_rate(self, k: int) -> float:
        """Expected tokens per second with k drafts per round (relative units before v0 is known)."""
        tokens, reach = 1.0, 1.0
        for j in range(k):
            reach *= self.acceptance(j)
            tokens += reach
        v0 = self._plain_step.get(1.0)
        time = v0 * (1 + max(0.0, self._verify_slope.get(self.PRIOR_VERIFY_SLOPE)) * k)
        time += self._draft_per_token.get(0.0) * k
        return tokens / time

    def _best_k(self) -> int:
        return max(range(self.max_k + 1), key=self.expected_rate)

    # ------------------------------------------------------------------ policy

    def next_k(self) -> int:
        if self.max_k == 0:
            return 0
        self._rounds_since_probe += 1
        if self._plain_step.value is None or (self.k > 0 and self._rounds_since_probe > self.probe_every):
            return 0  # measure v0 (an ordinary step, never wasted)
        if self.k == 0 and self._rounds_since_probe > self.probe_every:
            return 1  # speculation is off: probe whether it pays again
        return self.k

    def update(self, k: int, num_accepted: int, draft_time_s: float, verify_time_s: float) -> None:
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
        for j in range(self.max_k):
            self._tried[j] *= self.DECAY
            self._accepted[j] *= self.DECAY
        for j in range(min(k, num_accepted + 1)):
            self._tried[j] += 1.0
        for j in range(num_accepted):
            self._accepted[j] += 1.0
        self._draft_per_token.add(draft_time_s / k)
        v0 = self._plain_step.value
        if v0:
            # NOTE: no clipping at 0 here: timing noise is symmetric, clipping would bias β up.
            self._verify_slope.add((verify_time_s / v0 - 1.0) / k)
        if self._num_spec_rounds <= self.WARMUP_ROUNDS:
            self.k = plus_two_minus_one(k, num_accepted, self.max_k)  # until the model has data
        else:
            self.k = self._best_k()

    def summary(self) -> dict[str, float]:
        return {
            "k": float(self.k),
            "adaptive": 1.0,
            "acceptance_pos1": self.acceptance(0) if self.max_k else 0.0,
            "num_off_rounds": float(self.num_off_rounds),
        }
