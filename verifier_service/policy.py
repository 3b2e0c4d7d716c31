"""The speculation policy: how many draft tokens (and which drafter parameters) each row of
a target step gets, k = 0 allowed.

A *row* is one request inside a step of the target engine: today the single request of
`SpecDecodeLoop` (a one-row step), later one of many rows of the batched scheduler. The
scheduler talks to one `SpeculationPolicy` per verifier replica through three calls:

    row   = policy.start(request)                   # once per request
    plans = policy.plan(rows)                       # every step: a RowPlan per row
    ... draft, one target forward over all rows, accept ...
    policy.observe(rows, outcomes, step)            # a RowOutcome per row, the StepCost

Defaults (`shared.config.SpeculationConfig.methods`) are chosen per method on the training
prompts by `tools.choose_defaults` (never on benchmark prompts) as the simplest rule that
wins there; see docs/speculation.md for the figures. Two rules exist:

- `fixed`: always `num_speculative_tokens` (the default of every method, because the
  learning policies it replaced — a cost-model k, a UCB bandit over exit thresholds — lost
  8-13 % to it: their exploration and warm-up cost more rounds than they won);
- `plus2minus1`: Hugging Face assisted generation's heuristic (all drafts accepted →
  k + 2, else k − 1, floor 1, cap `max_speculative_tokens`), selectable per method.

Both depend only on acceptance, never on timings, so a seeded sampled request reproduces
(with rejection sampling k decides which uniforms are used where).

The policy also keeps `VerifyCost`, the measured cost of a target step by the number of
tokens it verifies: the batched scheduler needs it to decide how many draft tokens a step
can afford; `summary()` reports it.
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


@dataclass(slots=True)
class RowState:
    """What the policy keeps for one request (one row of a step)."""

    method: str
    rule: str  # FIXED | PLUS_TWO_MINUS_ONE
    k: int  # draft tokens the next step asks for
    max_k: int
    params: dict[str, float]  # drafter parameters for the whole request (may be empty)
    params_sent: bool = False  # the proposer has `params` (sticky on its side)


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
class VerifyCost:
    """Measured seconds of a target step per verified token count (EMA per count).

    On CPU the first extra token costs ~30 % of a step and later ones little (measured;
    not a line), so each count keeps its own estimate rather than a fitted slope.
    """

    alpha: float = 0.1
    seconds: dict[int, float] = field(default_factory=dict)  # num_tokens -> EMA seconds

    def observe(self, step: StepCost) -> None:
        old = self.seconds.get(step.num_tokens)
        new = step.seconds if old is None else old + self.alpha * (step.seconds - old)
        self.seconds[step.num_tokens] = new

    def ratio(self, num_tokens: int) -> float | None:
        """verify(num_tokens) / verify(1); None until both were measured."""
        base, cost = self.seconds.get(1), self.seconds.get(num_tokens)
        return None if not base or cost is None else cost / base


def plus_two_minus_one(k: int, num_draft: int, num_accepted: int, max_k: int) -> int:
    """HF assisted generation's heuristic: all k drafts accepted → k + 2, a rejection →
    k − 1 (floor 1); a short draft (n-gram found fewer) that was all accepted keeps k."""
    if num_accepted < num_draft:
        return max(1, k - 1)
    return min(max_k, k + 2) if num_draft >= k else k


class RulePolicy:
    """The configured rule per method (`SpeculationConfig.methods`); a request's own
    `num_speculative_tokens` pins a fixed k and its `drafter_params` override the method's."""

    def __init__(self, config: SpeculationConfig) -> None:
        self.config = config
        self.verify_cost = VerifyCost()

    def start(self, request: GenerationRequest) -> RowState:
        max_k = self.config.max_speculative_tokens
        method = self.config.methods.get(request.method)
        if method is not None:
            method = method.for_request(request.sampling.greedy)
        params = {**(method.drafter_params if method else {}), **request.drafter_params}
        if request.num_speculative_tokens is not None:  # pinned by the request
            return RowState(request.method, FIXED, request.num_speculative_tokens, max_k, params)
        if method is None:  # `none`, or a method without a configured rule
            return RowState(request.method, FIXED, 0, 0, {})
        return RowState(request.method, method.rule, min(method.num_speculative_tokens, max_k), max_k, params)

    def plan(self, rows: Sequence[RowState]) -> list[RowPlan]:
        plans = []
        for row in rows:
            params = None
            if row.params and not row.params_sent and row.k > 0:
                params, row.params_sent = row.params, True
            plans.append(RowPlan(row.k, params))
        return plans

    def observe(self, rows: Sequence[RowState], outcomes: Sequence[RowOutcome], step: StepCost) -> None:
        self.verify_cost.observe(step)
        for row, outcome in zip(rows, outcomes, strict=True):
            # NOTE: a round whose draft came back empty (a late or failed drafter) says
            # nothing about acceptance: k stays
            if row.rule == PLUS_TWO_MINUS_ONE and outcome.num_draft_tokens:
                row.k = plus_two_minus_one(
                    row.k, outcome.num_draft_tokens, outcome.num_accepted_tokens, row.max_k
                )

    def summary(self, row: RowState) -> dict[str, float]:
        out = {"k": float(row.k), "plus2minus1": float(row.rule == PLUS_TWO_MINUS_ONE), **row.params}
        for num_tokens in (2, 4, 6):
            ratio = self.verify_cost.ratio(num_tokens)
            if ratio is not None:
                out[f"verify_ratio.{num_tokens - 1}"] = ratio
        return out
