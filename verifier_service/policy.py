"""The speculation policy: how many draft tokens (and which drafter parameters) each row of
a target step gets, k = 0 allowed.

A *row* is one request inside a step of the batched loop (`verifier_service.loop`). The
loop talks to one `SpeculationPolicy` per verifier replica through three calls:

    row   = policy.start(request)                   # once per request
    plans = policy.plan(rows)                       # every step: a RowPlan per decoding row
    ... draft, one target forward over all rows, accept ...
    policy.observe(rows, outcomes, step)            # a RowOutcome per row, the StepCost

Defaults (`shared.config.SpeculationConfig.methods`) are chosen per method and sampling
mode on the training prompts by `tools.choose_defaults` (never on benchmark prompts) as the
simplest rule that wins there; see docs/speculation.md for the figures. Two rules exist:

- `fixed`: always `num_speculative_tokens` (the default of most methods, because the
  learning policies it replaced — a cost-model k, a UCB bandit over exit thresholds — lost
  8-13 % to it: their exploration and warm-up cost more rounds than they won);
- `plus2minus1`: Hugging Face assisted generation's heuristic (all drafts accepted →
  k + 2, else k − 1, floor 1, cap `max_speculative_tokens`).

On top, the load-aware cap (`RulePolicy`) cuts every row's k when the batch makes
verification compute-bound. Output never depends on k (`shared.rejection`), so neither
rule nor cap can change what a seeded request produces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from shared.config import SpeculationConfig
    from shared.types import GenerationRequest

FIXED = "fixed"
PLUS_TWO_MINUS_ONE = "plus2minus1"
PINNED = "pinned"  # the request's own num_speculative_tokens: never changed, never cut


@dataclass(slots=True)
class RowState:
    """What the policy keeps for one request (one row of a step)."""

    method: str
    rule: str  # FIXED | PLUS_TWO_MINUS_ONE | PINNED
    k: int  # draft tokens the next step asks for
    max_k: int
    params: dict[str, float]  # drafter parameters for the whole request (may be empty)
    params_sent: bool = False  # the proposer has `params` (sticky on its side)
    # acceptance, counted per draft position tried: an accepted one, or the first rejected
    num_accepted: int = 0
    num_trials: int = 0


@dataclass(slots=True)
class RowPlan:
    k: int  # draft tokens to ask for (the scheduler may cut it at the context's end)
    params: dict[str, float] | None  # drafter parameters to set first; None: unchanged


@dataclass(slots=True)
class RowOutcome:
    num_draft_tokens: int  # verified this step (0: the row decoded plainly)
    num_accepted_tokens: int


@dataclass(slots=True)
class StepCost:
    """One target forward: how many rows and tokens it verified, and what it cost."""

    num_rows: int
    num_tokens: int  # sum over rows of (draft tokens + 1)
    seconds: float


class SpeculationPolicy(Protocol):
    def start(self, request: GenerationRequest) -> RowState: ...

    def plan(self, rows: Sequence[RowState]) -> list[RowPlan]: ...

    def observe(self, rows: Sequence[RowState], outcomes: Sequence[RowOutcome], step: StepCost) -> None: ...

    def summary(self, row: RowState) -> dict[str, float]: ...


@dataclass(slots=True)
class StepCostModel:
    """Seconds of a target step as a line in the tokens it feeds, seconds ≈ a + b·n, fitted
    by least squares with exponential forgetting (recent steps weigh most; the replica's
    load and machine change). On this CPU a step of 1 row costs mostly `a` (per-step and
    per-layer overhead), a step of 32 rows x 4 tokens mostly `b·n` (the matmuls), which is
    what decides whether drafts still pay under load."""

    forget: float = 0.98  # weight kept per observation
    sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # Σw, Σw·n, Σw·n², Σw·t, Σw·n·t

    def observe(self, step: StepCost) -> None:
        n, t = float(step.num_tokens), step.seconds
        self.sums = [x * self.forget + d for x, d in zip(self.sums, (1.0, n, n * n, t, n * t))]

    def line(self) -> tuple[float, float] | None:
        """(a, b), or None until steps of different sizes were seen."""
        w, sn, snn, st, snt = self.sums
        det = w * snn - sn * sn
        if w < 4 or det <= 1e-9 * w * snn:  # all steps the same size: no slope yet
            return None
        b = max((w * snt - sn * st) / det, 0.0)
        a = max((st - b * sn) / w, 0.0)
        return a, b


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a row emits per step with k drafts when each is accepted with probability
    alpha after an accepted one: 1 + alpha + ... + alpha^k."""
    return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def plus_two_minus_one(k: int, num_draft: int, num_accepted: int, max_k: int) -> int:
    """HF assisted generation's heuristic: all k drafts accepted → k + 2, a rejection →
    k − 1 (floor 1); a short draft (n-gram found fewer) that was all accepted keeps k."""
    if num_accepted < num_draft:
        return max(1, k - 1)
    return min(max_k, k + 2) if num_draft >= k else k


class RulePolicy:
    """The configured rule per method (`SpeculationConfig.methods`); a request's own
    `num_speculative_tokens` pins a fixed k and its `drafter_params` override the method's.

    Load-aware (`speculation.load_aware`): each step's k per row is the rule's k cut at one
    cap for the whole step, the cap that maximises the step's goodput, expected emitted
    tokens over predicted step seconds:

        cap* = argmax_c  Σ_rows expected_tokens(alpha_row, min(k_row, c)) / (a + b·Σ_rows (min(k_row, c) + 1))

    with (a, b) the measured `StepCostModel` and alpha_row the row's acceptance (its own
    counts, shrunk towards its method's). A lone row on this CPU keeps its k (a step costs
    mostly a); a full batch whose matmuls dominate drops to k = 0 unless drafts are
    accepted often enough to pay for the tokens they add. A pinned k is never cut.
    """

    PRIOR_TRIALS = 8  # a new row's acceptance starts as its method's, worth this many trials
    # NOTE: a step of a few rows is bound by per-step overhead and reading weights (CPU and
    # GPU alike), where drafting pays whenever drafts are accepted at all; only fuller
    # batches become compute-bound. Below this many rows k stays the rule's, and only
    # steps this full fit the cost line.
    MIN_ROWS = 4
    PROBE_EVERY = 16  # every 16th step the cap is lifted, so acceptance stays measured

    def __init__(self, config: SpeculationConfig) -> None:
        self.config = config
        self.step_cost = StepCostModel()
        self.method_acceptance: dict[str, float] = {}  # EMA of alpha per method
        self.last_cap: int | None = None
        self.num_plans = 0

    def start(self, request: GenerationRequest) -> RowState:
        max_k = self.config.max_speculative_tokens
        method = self.config.methods.get(request.method)
        if method is not None:
            method = method.for_request(request.sampling.greedy)
        params = {**(method.drafter_params if method else {}), **request.drafter_params}
        if request.num_speculative_tokens is not None:  # pinned by the request
            return RowState(request.method, PINNED, request.num_speculative_tokens, max_k, params)
        if method is None:  # `none`, or a method without a configured rule
            return RowState(request.method, FIXED, 0, 0, {})
        return RowState(request.method, method.rule, min(method.num_speculative_tokens, max_k), max_k, params)

    def plan(self, rows: Sequence[RowState]) -> list[RowPlan]:
        self.num_plans += 1
        capped = self.config.load_aware and len(rows) >= self.MIN_ROWS and self.num_plans % self.PROBE_EVERY
        cap = self._cap(rows) if capped else None
        self.last_cap = cap
        plans = []
        for row in rows:
            k = row.k if cap is None or row.rule == PINNED else min(row.k, cap)
            params = None
            if row.params and not row.params_sent and k > 0:
                params, row.params_sent = row.params, True
            plans.append(RowPlan(k, params))
        return plans

    def alpha(self, row: RowState) -> float:
        prior = self.method_acceptance.get(row.method, 0.5)
        return (row.num_accepted + self.PRIOR_TRIALS * prior) / (row.num_trials + self.PRIOR_TRIALS)

    def _cap(self, rows: Sequence[RowState]) -> int | None:
        line = self.step_cost.line()
        ks = [row.k for row in rows if row.rule != PINNED]
        if line is None or not ks or max(ks) == 0:
            return None  # nothing measured yet, or nothing to cut
        a, b = line
        alphas = [self.alpha(row) for row in rows]
        best, best_cap = -1.0, None
        for cap in range(max(ks) + 1):
            k_eff = [row.k if row.rule == PINNED else min(row.k, cap) for row in rows]
            tokens = sum(expected_tokens(al, k) for al, k in zip(alphas, k_eff))
            goodput = tokens / (a + b * sum(k + 1 for k in k_eff))
            if goodput > best * 1.0001:  # ties go to the smaller cap (less work)
                best, best_cap = goodput, cap
        return best_cap

    def observe(self, rows: Sequence[RowState], outcomes: Sequence[RowOutcome], step: StepCost) -> None:
        if step.num_rows >= self.MIN_ROWS:
            self.step_cost.observe(step)
        for row, outcome in zip(rows, outcomes, strict=True):
            # NOTE: a round whose draft came back empty (a late or failed drafter, no
            # n-gram match) says nothing about acceptance: k and alpha stay
            if not outcome.num_draft_tokens:
                continue
            rejected = outcome.num_accepted_tokens < outcome.num_draft_tokens
            row.num_accepted += outcome.num_accepted_tokens
            row.num_trials += outcome.num_accepted_tokens + rejected
            alpha = (outcome.num_accepted_tokens / (outcome.num_accepted_tokens + rejected)
                     if outcome.num_accepted_tokens + rejected else 1.0)  # fmt: skip
            old = self.method_acceptance.get(row.method, 0.5)
            self.method_acceptance[row.method] = old + 0.05 * (alpha - old)
            if row.rule == PLUS_TWO_MINUS_ONE:
                row.k = plus_two_minus_one(
                    row.k, outcome.num_draft_tokens, outcome.num_accepted_tokens, row.max_k
                )

    def summary(self, row: RowState) -> dict[str, float]:
        out = {"k": float(row.k), "plus2minus1": float(row.rule == PLUS_TWO_MINUS_ONE), **row.params,
               "alpha": self.alpha(row)}  # fmt: skip
        line = self.step_cost.line()
        if line is not None:
            out["step_cost.a_ms"], out["step_cost.b_ms_per_token"] = line[0] * 1e3, line[1] * 1e3
        if self.last_cap is not None:
            out["load_cap"] = float(self.last_cap)
        return out
