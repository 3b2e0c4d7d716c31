"""The speculation policy: how many draft tokens (and which drafter parameters) each row of
a target step gets, k = 0 allowed.

A *row* is one request inside a step of the batched loop (`verifier_service.loop`). The
loop talks to one `SpeculationPolicy` per verifier replica through three calls:

    row   = policy.start(request)                   # once per request
    plans = policy.plan(rows, prefilling)           # every step: a RowPlan per decoding row
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

On top (`RulePolicy`), a step drafts only where drafting has measured more tokens per
second than plain steps at that batch size, for that method and sampling mode: a single
stream included, since on a CPU a model drafter can lose to plain decoding even alone.
Output never depends on k (`shared.rejection`), so neither rule nor load can change what a
seeded request produces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from shared.methods import MODEL_METHODS

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
    greedy: bool = True  # the request's sampling mode (load arms are per mode)
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
    """One step: how many rows and tokens its target forward fed, and the seconds from its
    start to the next step's (drafting, the forward, bookkeeping, streaming)."""

    num_rows: int
    num_tokens: int  # sum over rows of (draft tokens + 1)
    seconds: float
    drafter_s: float = 0.0  # drafter CPU seconds the pool reported for this step's drafts
    stopped_drafter_s: float = 0.0  # ... reported as a run-ahead stopped at this step (drafts before it)
    num_prefill_rows: int = 0  # rows fed a prompt chunk besides the decoding ones
    stall_s: float | None = None  # seconds some task of the machine waited for a CPU (None: unknown)
    num_catching_up: int = 0  # decoding rows asked to draft whose drafter was still catching up (ran plain)


class SpeculationPolicy(Protocol):
    def start(self, request: GenerationRequest) -> RowState: ...

    def plan(self, rows: Sequence[RowState], prefilling: bool = False) -> list[RowPlan]:
        """`prefilling`: the step also feeds prompt chunks (its time is mostly theirs)."""
        ...

    def observe(self, rows: Sequence[RowState], outcomes: Sequence[RowOutcome], step: StepCost) -> None: ...

    def summary(self, row: RowState) -> dict[str, float]: ...


ArmKey = tuple[int, str, bool]  # (batch bucket, method, greedy)


@dataclass(slots=True)
class _Arms:
    """One key's two arms."""

    goodput: dict[bool, float] = field(default_factory=dict)  # drafting -> tok/s (`pace`'s ratio)
    pace: dict[bool, tuple[float, float]] = field(default_factory=dict)  # drafting -> EMAs (tokens, seconds)
    seconds: float = 0.0  # every measured step under this key
    regret_s: float = 0.0  # what probes cost beyond the better arm's pace
    drafting_best: bool | None = None  # the arm that runs (None: not both measured yet)
    steps_since_probe: int = 0
    probe_gap: int = 0  # steps between probes now (0: `min_probe_gap`)
    num_measured: dict[bool, int] = field(default_factory=dict)  # drafting -> measured steps here
    probe_left: int = 0  # steps still to take in the current probe run


@dataclass(slots=True)
class Tally:
    """Measured steps of one arm (warm-up steps excluded), summed."""

    tokens: float = 0.0
    seconds: float = 0.0
    steps: int = 0


@dataclass(slots=True)
class LoadArms:
    """Measured goodput (emitted tokens per second of the loop's whole cycle: drafting, the
    target's forward, bookkeeping and streaming) of steps with drafting on and off, per
    batch size (rows rounded down to a power of two), method and sampling mode. Measured
    rather than modelled: on a shared machine drafters compete with the target for the same
    cores, and what a draft token costs against a target step differs by drafter, target,
    mode and load, none of which a cost line of the target's forward sees.

    An arm's goodput is the ratio of its averaged tokens and averaged seconds: a plain mean
    over its first 1 / `alpha` measured steps, an EMA over about as many after that. (An EMA
    started at the first step kept that one step at 95 % weight for the next step, and a
    probe measures one step: a drafter's goodput stayed what its first step said for about
    twenty probes.) Each arm is tried once, then the better one runs (the
    running one stays until the other leads by `switch_margin`) and the other is *probed*
    now and then, so a change of traffic is noticed. A probe's cost is its regret: its seconds
    beyond what the better arm would have taken for the same tokens. Probes come at most
    every `min_probe_gap` steps and only while the regret of all probes so far stays within
    `probe_share` of the key's step time: a drafting step that loses badly (on a CPU it can
    take five plain steps' time) is probed rarely, and arms that are close are probed
    often, for free. While drafting loses by more than `backoff_margin`, it is probed only
    every `max_probe_gap` steps: the regret seen in the loop misses what a probe costs outside
    it (the pool opening sessions, catching up on their contexts and drafting on cores the
    router and the clients need). Measured on target-s at 2 rows, `sorted` drafting 25 %
    behind plain: probes whose gap doubled from `min_probe_gap` drafted in 2-3 % of steps,
    1.8 % of the loop's time by its own regret, and cost 7 % of throughput end to end; with
    the gap at its maximum from the first clear loss, 1 % of steps and 0.98x `none`. A pool
    drafter that loses by less backs off too, its gap doubling at each probe (`_next_gap`);
    an in-process one (`ngram`) that is close is probed every `min_probe_gap` steps.
    (A share of 0.5 % instead of 2 % was tried, one 6-repeat sweep: sampled `sorted` on
    target-s then drafted in 1.6-2.4 % of rounds at 1-2 rows instead of 0.4 %, and ended
    at 0.89-0.95x `none` at 2-8 rows; why it drafted more is not known.)

    Drafting needs a warm-up after plain steps: a drafter that was idle catches up on the
    context, and a run-ahead drafter (`card`) has nothing cached yet. The first
    `warmup_steps` drafting steps after a plain step are therefore not measured (their
    regret still counts), and a probe of drafting lasts `warmup_steps + 2` steps.

    A batch size seen for the first time starts from the next smaller measured one where
    drafting lost there: drafting pays less the fuller the batch, so it would lose here too,
    and trying it first (a warm-up and a measured step, each as slow as several plain
    steps at a full batch) would cost more than the probes that confirm it. For the same
    reason drafting is not probed at a batch size while it loses at the next smaller one:
    probes there notice a change of traffic, and a larger size is probed again once drafting
    wins below it. A pool drafter is not even tried at more than 2 rows before it has won at
    a smaller size (`_may_explore`): its first steps there cost a pool session per row.
    (Measured: `sorted` at 32 rows on target-s spent 8 % of its time in probes of 16 and 32
    rows, each step several times a plain one, and lost that to `none`.)

    A replica may start warm (`seed`, from other replicas' measurements in the store,
    `verifier_service.policy_stats`): a seeded arm is not measured first, and the first
    local measurement of it replaces the seed instead of being averaged with it. Measured
    steps are also summed in `unpublished` for the store (`take_unpublished`)."""

    alpha: float = 0.05  # EMA weight of a new step: per-prompt acceptance swings average out
    probe_share: float = 0.02
    min_probe_gap: int = 8
    max_probe_gap: int = 1024  # about 7 s of 8-row steps of target-s, 40 s of 64 rows of target-m
    backoff_margin: float = 0.1
    warmup_steps: int = 2
    switch_margin: float = 0.03
    drafting_margin: float = 0.1  # drafting's measured goodput counts this much less (see `_better`)
    arms: dict[ArmKey, _Arms] = field(default_factory=dict)
    drafting_run: int = 0  # drafting steps in a row, any key (0: the last step was plain)
    unpublished: dict[tuple[ArmKey, bool], Tally] = field(default_factory=dict)  # (key, drafting)

    @staticmethod
    def bucket(num_rows: int) -> int:
        return 1 << (num_rows.bit_length() - 1)

    def choose(self, key: ArmKey, measurable: bool = True) -> tuple[bool, bool]:
        """(draft in this step?, is it a probe?): an unmeasured arm first (drafting), then
        the better one, or the other on a probe step. A step that cannot be measured (it
        also prefills) neither explores nor starts a probe: it runs the better arm, plain
        while they are unmeasured, and goes on with a probe under way."""
        arms = self.arms.get(key)
        if arms is None:
            arms = self.arms[key] = _Arms(goodput=self._losing_below(key))
        on, off = arms.goodput.get(True), arms.goodput.get(False)
        if on is None or off is None:
            return measurable and on is None and self._may_explore(key), False
        best = self._better(arms.drafting_best, on, off)
        if arms.drafting_best is not None and best != arms.drafting_best:
            arms.probe_gap = 0  # the gap grew while the other arm ran: probe the loser soon
        arms.drafting_best = best
        if arms.probe_left > 0 and best is False:  # (a probe of drafting that made it the best ends)
            arms.probe_left -= 1
            return True, True
        arms.probe_left = 0
        arms.steps_since_probe += 1
        if best is False and self._losing_below(key):
            return False, False  # drafting lost at a smaller batch: it loses here too, no probe
        gap = arms.probe_gap or self.min_probe_gap
        if measurable and arms.steps_since_probe >= gap and arms.regret_s <= self.probe_share * arms.seconds:
            arms.steps_since_probe = 0
            arms.probe_gap = self._next_gap(key, best, on, off, gap)
            arms.probe_left = self.warmup_steps + 1 if best is False else 0  # a run of drafting
            return not best, True
        return best, False

    def _next_gap(self, key: ArmKey, drafting_best: bool, on: float, off: float, gap: int) -> int:
        """Steps until the probe after this one. While drafting runs, or loses by a little
        with an in-process drafter, `min_probe_gap`; while it loses by more than
        `backoff_margin`, `max_probe_gap`. A pool drafter that loses by a little backs off
        too, doubling the gap at each probe: its probe costs more than the loop sees (the
        pool catches up on the row's context, on cores the verifier needs). Measured on
        target-s at one stream, `sorted` about even with plain: probed every 8 steps it
        drafted in 2 % of rounds and ended 0.95x `none` (bench.loadtest, 4 repeats)."""
        if drafting_best:
            return self.min_probe_gap
        if on < off * (1 - self.backoff_margin):
            return self.max_probe_gap
        if key[1] in MODEL_METHODS:
            return min(self.max_probe_gap, 2 * gap)
        return self.min_probe_gap

    def _better(self, current: bool | None, on: float, off: float) -> bool:
        """Drafting or not: the running arm stays unless the other one is ahead by more than
        `switch_margin`. Measured: one sampled stream on target-m drafted at 151-155 tok/s
        and ran plain at 151; per-step noise flipped the arms back and forth, and every
        flip to drafting paid the drafter's warm-up (2 steps at 85 % of the pace).

        Drafting's goodput counts `drafting_margin` less: the loop's cycle misses part of
        what drafting costs where the pool shares the machine (the router and the clients
        starved while it drafts, a pool catching up after the step moved on). Measured on
        target-m, 16 concurrent, `sorted`: drafting led plain by 3 % in the loop at 8 rows
        (610 vs 593 tok/s), ran there, and the level ended at 0.80x `none`."""
        on = on / (1 + self.drafting_margin)
        if current is None:
            return on >= off
        if current:
            return not off > on * (1 + self.switch_margin)
        return on > off * (1 + self.switch_margin)

    def _may_explore(self, key: ArmKey) -> bool:
        """May drafting be tried at this batch size before it is measured? Always for an
        in-process drafter (`ngram`: a try costs a step or two) and at 1-2 rows; at more
        rows, a pool drafter only where drafting won at the largest smaller size measured.
        A pool drafter's first drafting steps open a session per row, and the pool
        prefills every row's context at once on the cores the target's batch needs:
        measured at 200 concurrent requests on target-s, a fresh replica tried `sorted`
        at 32 rows, then at 16, 8 and 4 as the batch drained (3 steps each), drafted in
        under 1 % of rounds and ended at 0.83x `none`; with k pinned to 0, 0.96x."""
        bucket, method, _ = key
        if bucket <= 2 or method not in MODEL_METHODS:
            return True
        below = self._measured_below(key)
        return below is not None and below[True] >= below[False]

    def _losing_below(self, key: ArmKey) -> dict[bool, float]:
        """The goodput of the largest smaller batch size measured for this method and mode,
        if drafting lost there; else nothing (measure this one from scratch)."""
        below = self._measured_below(key)
        return dict(below) if below is not None and below[True] < below[False] else {}

    def _measured_below(self, key: ArmKey) -> dict[bool, float] | None:
        """Both arms' goodput at the largest smaller batch size where both are measured."""
        bucket, method, greedy = key
        while bucket > 1:
            bucket //= 2
            below = self.arms.get((bucket, method, greedy))
            if below is not None and len(below.goodput) == 2:
                return below.goodput
        return None

    def count(self, drafting: bool) -> None:
        """A step taken, measured or not (the warm-up counts drafting steps in a row)."""
        self.drafting_run = self.drafting_run + 1 if drafting else 0

    def defer_drafting(self, key: ArmKey, probe: bool) -> None:
        """A drafting step that ran plain (its drafters were catching up): not measured,
        and a probe of drafting gets the step back."""
        self.count(False)
        arms = self.arms.get(key)
        if probe and arms is not None:
            arms.probe_left += 1

    def observe(self, key: ArmKey, drafting: bool, probe: bool, tokens: int, seconds: float) -> None:
        self.count(drafting)
        arms = self.arms.get(key)
        if arms is None or seconds <= 0:
            return
        arms.seconds += seconds
        if probe:
            arms.regret_s += max(0.0, seconds - tokens / arms.goodput[not drafting])
        if drafting and self.drafting_run <= self.warmup_steps:
            return  # warming up: says nothing about drafting's pace
        tally = self.unpublished.setdefault((key, drafting), Tally())
        tally.tokens, tally.seconds, tally.steps = tally.tokens + tokens, tally.seconds + seconds, tally.steps + 1
        # NOTE: the ratio of averaged tokens and seconds, not an average of per-step ratios:
        # a drafting step emits 1 to k + 1 tokens per row, and averaging each step's tok/s
        # weighs short, lucky steps up (one sampled stream on target-m: the arms ran
        # draft_model plain in 89 % of steps where drafting won 2 %)
        # (a seeded goodput, from another machine or an earlier run, and one taken over from
        # a smaller batch size count no measured step here: the first local one replaces them)
        n = arms.num_measured[drafting] = arms.num_measured.get(drafting, 0) + 1
        weight = max(self.alpha, 1 / n)  # a mean first, then an EMA
        old_tokens, old_seconds = arms.pace.get(drafting, (tokens, seconds))
        tokens, seconds = old_tokens + weight * (tokens - old_tokens), old_seconds + weight * (seconds - old_seconds)
        arms.pace[drafting] = (tokens, seconds)
        arms.goodput[drafting] = tokens / seconds

    def seed(self, key: ArmKey, goodput: dict[bool, float]) -> int:
        """Start `key`'s arms that have no measurement here from `goodput` (none of their
        steps measured, so the first local one replaces it); the number of arms seeded."""
        arms = self.arms.setdefault(key, _Arms())
        fresh = {drafting: value for drafting, value in goodput.items() if drafting not in arms.goodput}
        arms.goodput.update(fresh)
        return len(fresh)

    def take_unpublished(self) -> dict[tuple[ArmKey, bool], Tally]:
        """The measured steps summed since the last call (the step thread's, or after it stopped)."""
        out, self.unpublished = self.unpublished, {}
        return out


def plus_two_minus_one(k: int, num_draft: int, num_accepted: int, max_k: int) -> int:
    """HF assisted generation's heuristic: all k drafts accepted → k + 2, a rejection →
    k − 1 (floor 1); a short draft (n-gram found fewer) that was all accepted keeps k."""
    if num_accepted < num_draft:
        return max(1, k - 1)
    return min(max_k, k + 2) if num_draft >= k else k


class RulePolicy:
    """The configured rule per method (`SpeculationConfig.methods`); a request's own
    `num_speculative_tokens` pins a fixed k and its `drafter_params` override the method's.

    Load-aware (`speculation.load_aware`): a step either drafts with every row's rule k or
    not at all, whichever has given more emitted tokens per second of step at that batch
    size for the step's main method and sampling mode (`LoadArms`, which probes the other
    choice now and then). A pinned k is never cut.

    Every batch size goes through the arms, a single stream included. A greedy single
    stream used to keep the rule's k (alone, drafting paid 1.1-2.9x plain for every method
    when the target's forward was slow), but since the lean forward's one-row steps got
    1.5x faster a pool drafter's round trip costs about what its accepted tokens save:
    `sorted` alone drafted in 82 % of rounds and gave 0.94x `none` on target-m, 0.95x on
    target-s (bench.loadtest, greedy, c = 1). The arms' mean-first averages
    (`LoadArms.observe`) keep one unlucky first step from deciding.
    """

    # NOTE: between two requests of a closed loop of 2-4 clients the batch dips to one row
    # for a few steps (the next request is still in the router or prefilling). Drafting
    # there, as a single stream would, started `card`'s run-ahead (a pool session prefilled)
    # only to stop it a few steps later: at 2-4 rows, drafting in 0-0.1 % of steps,
    # `card` ended 6-10 % below `none` on target-s. So the first `DIP_STEPS` single-row
    # steps after a step of several rows run plain and are not measured.
    DIP_STEPS = 8

    def __init__(self, config: SpeculationConfig) -> None:
        self.config = config
        self.arms = LoadArms()
        self._step: tuple[ArmKey, bool, bool] | None = None  # (key, drafting, probe) planned
        self._single_steps = self.DIP_STEPS  # single-row steps since the last step of several
        self._owed_drafter_s = 0.0  # stopped run-aheads' compute, for the next measured drafting step
        # called on the step thread after each observed step (`policy_stats` publishes from it)
        self.after_observe: Callable[[], None] | None = None

    def start(self, request: GenerationRequest) -> RowState:
        max_k = self.config.max_speculative_tokens
        greedy = request.sampling.greedy
        method = self.config.methods.get(request.method)
        if method is not None:
            method = method.for_request(greedy)
        params = {**(method.drafter_params if method else {}), **request.drafter_params}
        if request.num_speculative_tokens is not None:  # pinned by the request
            return RowState(request.method, PINNED, request.num_speculative_tokens, max_k, params, greedy)
        if method is None:  # `none`, or a method without a configured rule
            return RowState(request.method, FIXED, 0, 0, {}, greedy)
        k = min(method.num_speculative_tokens, max_k)
        return RowState(request.method, method.rule, k, max_k, params, greedy)

    def plan(self, rows: Sequence[RowState], prefilling: bool = False) -> list[RowPlan]:
        self._step = None
        if len(rows) == 1:
            self._single_steps += 1
        elif rows:  # (a step that only prefills is no batch: a single stream's next request)
            self._single_steps = 0
        drafting = True
        kinds = [(r.method, r.greedy) for r in rows if r.k and r.rule != PINNED]
        kind = max(set(kinds), key=kinds.count) if kinds else None
        if self.config.load_aware and kind:
            if len(rows) == 1 and self._single_steps <= self.DIP_STEPS:
                drafting = False  # a dip between requests of a batch: plain, unmeasured
            else:
                key = (LoadArms.bucket(len(rows)), *kind)
                # NOTE: a step that also prefills measures nothing (`observe`), so it must
                # not explore: at 200 concurrent requests a batch of 31 decoding rows came
                # only with a new request's prompt chunk, its drafting arm stayed unmeasured,
                # and every such step drafted (cold pool sessions, the 50 ms draft deadline
                # each time): `sorted` ended at 0.57-0.75x `none`
                drafting, probe = self.arms.choose(key, measurable=not prefilling)
                self._step = (key, drafting, probe)
        plans = []
        for row in rows:
            k = row.k if drafting or row.rule == PINNED else 0
            params = None
            if row.params and not row.params_sent and k > 0:
                params, row.params_sent = row.params, True
            plans.append(RowPlan(k, params))
        return plans

    def observe(self, rows: Sequence[RowState], outcomes: Sequence[RowOutcome], step: StepCost) -> None:
        # NOTE: what a run-ahead drafter (`card`) spent before a plain step stopped it is
        # drafting's cost: charged to that plain step, it halved the measured pace of
        # `card`'s plain steps (a plain probe follows drafting steps and took in their
        # run-ahead), so `card` drafted at 4 rows and lost 20 %
        self._owed_drafter_s += step.stopped_drafter_s
        if self._step is not None and self._step[1] and rows and step.num_catching_up >= len(rows):
            # NOTE: no row drafted: each one's drafter was still catching up on its context
            # (the loop did not wait for it), so the step was plain; a probe of drafting
            # waits for the drafters instead of measuring them cold. (Waiting in the step
            # for a pool session's prefill cost a probe about 40 ms at one row of target-s,
            # ten plain steps.)
            key, _, probe = self._step
            self.arms.defer_drafting(key, probe)
            self._step = None
        if step.num_prefill_rows:
            # NOTE: a step that also prefilled a prompt chunk spent most of its time on it
            # (a plain step of 4 rows measured 42 tok/s so, a tenth of its pace): it says
            # nothing about drafting or not; it still counts as a plain or drafting step
            self.arms.count(bool(self._step and self._step[1]))
            self._step = None
        if self._step is not None:
            tokens = sum(o.num_accepted_tokens + 1 for o in outcomes)
            # NOTE: a pool on this machine drafts on the cores the verifier, the router and
            # the clients also need: under load its CPU time is time nobody else had, which
            # the loop's own cycle does not show (measured: drafting won the loop's cycle at
            # 8-64 rows and lost 5-28 % end to end). It is charged only as far as some task
            # of the machine waited for a CPU during the step (pressure stall information):
            # at 1-2 rows the router and the clients leave the pool a core of its own, and
            # charging all of `card`'s run-ahead (0.65 of a core) there ran it plain where it
            # gave 1.27x `none` on target-m
            key, drafting, probe = self._step
            drafter_s = step.drafter_s
            if drafting:
                drafter_s, self._owed_drafter_s = drafter_s + self._owed_drafter_s, 0.0
            charged = 0.0
            if self.config.charge_drafter_compute:
                charged = drafter_s if step.stall_s is None else min(drafter_s, step.stall_s)
            self.arms.observe(key, drafting, probe, tokens=tokens, seconds=step.seconds + charged)
            self._step = None
            if self.after_observe is not None:
                self.after_observe()
        for row, outcome in zip(rows, outcomes, strict=True):
            # NOTE: a round whose draft came back empty (a late or failed drafter, no
            # n-gram match) says nothing about acceptance: k stays
            if row.rule == PLUS_TWO_MINUS_ONE and outcome.num_draft_tokens:
                row.k = plus_two_minus_one(
                    row.k, outcome.num_draft_tokens, outcome.num_accepted_tokens, row.max_k
                )

    def summary(self, row: RowState) -> dict[str, float]:
        out = {"k": float(row.k), "plus2minus1": float(row.rule == PLUS_TWO_MINUS_ONE), **row.params}
        for (bucket, method, greedy), arms in sorted(self.arms.arms.items()):
            if (method, greedy) == (row.method, row.greedy):
                for drafting, goodput in arms.goodput.items():
                    out[f"goodput.{bucket}_rows.{'drafting' if drafting else 'plain'}"] = goodput
        return out
