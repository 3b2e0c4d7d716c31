"""The verifier policy's measured goodput in the store, so a new or restarted replica starts
warm (DESIGN.md, "Store keys"; `LoadArms` in `verifier_service.policy`).

    specdec:stats:<target>:<drafter>:<variant>  ->  sorted set of counters
        member = b"<bucket>:<arm>:<field>"  bucket: batch rows (a power of two, LoadArms.bucket);
                 arm: 1 drafting, 0 plain; field: t (emitted tokens), s (seconds), n (steps)
        score  = that sum over the measured steps of every replica of the target

`<drafter>` is the pool drafter the method's sessions ask for (the method's `drafter`, else
the first configured drafter of its kind, for `card` of any kind), or the method itself
where none is configured (`ngram`, model-free). `<variant>` is the method, the sampling mode
and what the policy does with them: `<method>.<greedy|sampled>.<rule>.k<k>` followed by the
method's drafter parameters (`.fixed_exit=1`). A changed rule, k or drafter thus starts new
counters instead of inheriting a pace measured under other settings.

Counters rather than each replica's averages: every replica adds what it measured since its
last write (ZINCRBY), so replicas merge without reading each other's values, and the
merged pace of an arm is its tokens over its seconds. The key's TTL (renewed at each write)
forgets a target nobody has served for `DEFAULT_TTL_S`.

Writes: the step thread sums measured steps (`LoadArms.unpublished`) and, at most every
`publish_every_s`, hands them to the store's thread (`StoreRunner.submit`) without waiting;
`close` writes the rest. A write that fails loses its deltas (counted): statistics are a
hint, never worth a retry queue.

Reads: once, at replica start-up, bounded by `wait_s`; a store that does not answer means a
cold start with a warning. Arms with at least `MIN_STEPS` merged steps seed `LoadArms` (see
there: marked seeded, the first local measurement replaces the seed, probes go on). A value
that is not ours (a foreign member, a non-finite or negative count, an implausible pace, or
more members than we ever write) is ignored and counted (`STORE_BAD_VALUES`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shared import metrics
from shared.methods import IN_PROCESS_METHODS, RUN_AHEAD_METHODS
from shared.store import PREFIX, StoreRunner
from verifier_service.policy import ArmKey, LoadArms, RulePolicy, Tally

if TYPE_CHECKING:
    from shared.config import SpecdecConfig

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 7 * 24 * 3600
DEFAULT_PUBLISH_EVERY_S = 10.0
DEFAULT_WAIT_S = 1.0
# merged measured steps an arm needs to seed: one, as a cold LoadArms decides from its first
# measured step too (a seed is never less informed than that; probes correct both)
MIN_STEPS = 1
MAX_BUCKET = 1 << 16
FIELDS = ("t", "s", "n")
# every bucket up to MAX_BUCKET, both arms, each field: more members than this is not ours
MAX_MEMBERS = (MAX_BUCKET.bit_length()) * 2 * len(FIELDS)
MAX_GOODPUT = 1e7  # tokens per second: above, the counters are not a measurement

StatsKey = tuple[str, bool]  # (method, greedy): one store key, every bucket under it


def stats_key(target: str, drafter: str, variant: str) -> str:
    return f"{PREFIX}stats:{target}:{drafter}:{variant}"


def drafter_name(config: SpecdecConfig, target: str, method: str) -> str:
    """The pool drafter `method`'s sessions ask for; the method itself where none is."""
    spec = config.speculation_for(target).methods.get(method)
    if spec is not None and spec.drafter:
        return spec.drafter
    if method not in IN_PROCESS_METHODS:
        for drafter in config.drafters:
            if drafter.kind == method or method in RUN_AHEAD_METHODS:
                return drafter.name
    return method


def variant(config: SpecdecConfig, target: str, method: str, greedy: bool) -> str:
    spec = config.speculation_for(target).methods[method].for_request(greedy)
    params = "".join(f".{name}={value:g}" for name, value in sorted(spec.drafter_params.items()))
    return f"{method}.{'greedy' if greedy else 'sampled'}.{spec.rule}.k{spec.num_speculative_tokens}{params}"


def store_keys(config: SpecdecConfig, target: str) -> dict[StatsKey, str]:
    """The store key of every (method, mode) the target's policy keeps arms for."""
    return {
        (method, greedy): stats_key(target, drafter_name(config, target, method), variant(config, target, method, greedy))
        for method in config.speculation_for(target).methods
        for greedy in (True, False)
    }


# ---------------------------------------------------------------- pack / unpack


def member(bucket: int, drafting: bool, name: str) -> bytes:
    return f"{bucket}:{int(drafting)}:{name}".encode()


def updates(keys: dict[StatsKey, str], tallies: dict[tuple[ArmKey, bool], Tally]) -> list[tuple[str, bytes, float]]:
    """`Store.incr_counts` updates adding `tallies` to their keys' counters."""
    out = []
    for ((bucket, method, greedy), drafting), tally in tallies.items():
        key = keys.get((method, greedy))
        if key is None or tally.steps == 0:
            continue
        for name, amount in zip(FIELDS, (tally.tokens, tally.seconds, tally.steps), strict=True):
            out.append((key, member(bucket, drafting, name), float(amount)))
    return out


def parse(entries: Sequence[tuple[bytes, float]]) -> tuple[dict[tuple[int, bool], Tally], int]:
    """One key's counters by (bucket, drafting), and how many members were not ours."""
    if len(entries) > MAX_MEMBERS:
        return {}, 1  # oversized: not a value we wrote
    out: dict[tuple[int, bool], Tally] = {}
    bad = 0
    for raw, score in entries:
        try:
            bucket_s, arm, name = raw.decode("ascii").split(":")
            bucket = int(bucket_s)
        except (UnicodeDecodeError, ValueError):
            bad += 1
            continue
        ok = (0 < bucket <= MAX_BUCKET and bucket & (bucket - 1) == 0 and arm in ("0", "1")
              and name in FIELDS and math.isfinite(score) and score >= 0)  # fmt: skip
        if not ok:
            bad += 1
            continue
        tally = out.setdefault((bucket, arm == "1"), Tally())
        if name == "t":
            tally.tokens = score
        elif name == "s":
            tally.seconds = score
        else:
            tally.steps = int(score)
    return out, bad


def goodputs(tallies: dict[tuple[int, bool], Tally]) -> tuple[dict[int, dict[bool, float]], int]:
    """Merged pace (tokens / second) per bucket and arm, for arms measured `MIN_STEPS`
    times; and how many arms had an implausible pace (not ours)."""
    out: dict[int, dict[bool, float]] = {}
    bad = 0
    for (bucket, drafting), tally in tallies.items():
        if tally.steps < MIN_STEPS:
            continue
        if tally.seconds <= 0 or tally.tokens < tally.steps or tally.tokens / tally.seconds > MAX_GOODPUT:
            bad += 1  # every step emits a token at least, and takes time
            continue
        out.setdefault(bucket, {})[drafting] = tally.tokens / tally.seconds
    return out, bad


async def read(runner: StoreRunner, keys: dict[StatsKey, str]) -> dict[ArmKey, dict[bool, float]]:
    """The merged paces under `keys` (on the store's thread); bad values counted."""
    wanted = list(keys.items())
    replies = await runner.store.top([key for _, key in wanted], MAX_MEMBERS + 1)
    out: dict[ArmKey, dict[bool, float]] = {}
    bad = 0
    for ((method, greedy), _), entries in zip(wanted, replies, strict=True):
        tallies, bad_members = parse(entries)
        paces, bad_arms = goodputs(tallies)
        bad += bad_members + bad_arms
        for bucket, goodput in paces.items():
            out[(bucket, method, greedy)] = goodput
    if bad:
        metrics.STORE_BAD_VALUES.labels(runner.store.name).inc(bad)
    return out


# ---------------------------------------------------------------- a replica's statistics


class PolicyStats:
    """One replica's link between its policy's `LoadArms` and the store."""

    def __init__(self, runner: StoreRunner, target: str, keys: dict[StatsKey, str], arms: LoadArms, *,
                 publish_every_s: float = DEFAULT_PUBLISH_EVERY_S, ttl_s: int = DEFAULT_TTL_S) -> None:  # fmt: skip
        self.runner = runner
        self.target = target
        self.keys = keys
        self.arms = arms
        self.publish_every_s = publish_every_s
        self.ttl_s = ttl_s
        self.num_seeded = 0  # arms seeded at start-up
        self.policy: RulePolicy | None = None  # the policy whose steps call `after_step`
        self._next_publish = time.monotonic() + publish_every_s

    @classmethod
    def attach(cls, runner: StoreRunner, config: SpecdecConfig, target: str, policy: object, *,
               wait_s: float = DEFAULT_WAIT_S, **kwargs) -> PolicyStats | None:  # fmt: skip
        """Seed `policy`'s arms from the store (waiting at most `wait_s`) and publish its
        measurements from now on; None where the policy keeps no arms."""
        if not isinstance(policy, RulePolicy) or not policy.config.load_aware:
            return None
        stats = cls(runner, target, store_keys(config, target), policy.arms, **kwargs)
        stats.seed(wait_s)
        policy.after_observe, stats.policy = stats.after_step, policy
        return stats

    def seed(self, wait_s: float) -> int:
        """Seed the arms from the store's merged counters; a store that does not answer in
        `wait_s` leaves them cold. Before the step loop runs: it owns the arms after."""
        try:
            paces = self.runner.submit(read, self.runner, self.keys).result(wait_s)
        except Exception as e:  # noqa: BLE001 - no statistics = a cold start, never a failed one
            logger.warning("policy statistics of %s unreadable (%s): starting cold", self.target, str(e) or type(e).__name__)
            metrics.POLICY_STATS.labels(self.target, "read_failed").inc()
            return 0
        self.num_seeded = sum(self.arms.seed(key, goodput) for key, goodput in paces.items())
        metrics.POLICY_STATS.labels(self.target, "seeded").inc(self.num_seeded)
        if self.num_seeded:
            logger.info("policy of %s starts warm: %d arms from the store", self.target, self.num_seeded)
        return self.num_seeded

    def after_step(self) -> None:
        """The step thread, after each observed step: one clock read, a write now and then."""
        now = time.monotonic()
        if now >= self._next_publish:
            self._next_publish = now + self.publish_every_s
            self.publish()

    def publish(self) -> concurrent.futures.Future | None:
        """Queue the measurements since the last write (never waits)."""
        batch = updates(self.keys, self.arms.take_unpublished())
        if not batch:
            return None
        future = self.runner.submit(self.runner.store.incr_counts, batch, MAX_MEMBERS, self.ttl_s)
        future.add_done_callback(self._written)
        return future

    def _written(self, future: concurrent.futures.Future) -> None:
        failed = future.exception() is not None
        metrics.POLICY_STATS.labels(self.target, "write_failed" if failed else "written").inc()
        if failed:
            logger.debug("policy statistics write failed: %s", future.exception())

    def close(self, timeout_s: float = 2.0) -> None:
        """Write what is left (after the step loop stopped), waiting at most `timeout_s`."""
        if self.policy is not None and self.policy.after_observe == self.after_step:
            self.policy.after_observe = None  # a policy outliving this replica (tests) stops publishing
        future = self.publish()
        if future is not None:
            try:
                future.result(timeout_s)
            except Exception as e:  # noqa: BLE001 - statistics are a hint
                logger.debug("policy statistics: last write failed: %s", e)
