"""The `Proposer` protocol every drafter implements (n-gram, draft model, sorted, remote).

A proposer is per session (one generation request). Its factory (`ProposerFactory`) holds
what sessions share: model weights, tables. The verifier's loop calls, once per round:

    proposer.set_params(params)                # only when the policy changed them (sorted)
    draft = proposer.propose(context_ids, k)   # context = prompt + every token emitted so far
    ... verify ...
    proposer.update(num_accepted)              # feedback only; context carries the truth

`propose` receives the whole accepted context every round, so an incremental proposer
reconciles its own state (KV cache, tree) against it: keep the longest common prefix, drop
the rest. That makes "incremental equals recomputed from scratch" a property of one
function instead of a protocol both sides must keep in step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from shared.config import DrafterConfig
    from shared.sampling import SamplingParams


@dataclass(slots=True)
class Draft:
    """Candidates for one round.

    `draft_probs is None` means the draft was chosen deterministically (argmax, n-gram,
    top-K tree node): its q is one-hot, whatever probability the drafter computed.
    `exit_layers` (nested drafters) is the exit depth each token left at; the verifier's
    exit policy learns per-exit acceptance from it.
    """

    token_ids: list[int]  # [k]
    draft_probs: torch.Tensor | None = None  # [k, vocab_size], q after temperature/top-p/top-k
    info: dict[str, float] = field(default_factory=dict)  # proposer-specific stats (exit depths)
    exit_layers: list[int] | None = None  # [k] exit depth per draft token (sorted), else None
    # A tree (`shared.draft_tree`): parent of each token (-1 = the last context token),
    # parents first; `node_probs` the drafter's q of each node given its parent. None: a chain.
    tree_parents: list[int] | None = None
    node_probs: list[float] | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def line_ids(self) -> list[int]:
        """The first branch: the tokens before the first node that is not its predecessor's child."""
        if self.tree_parents is None:
            return self.token_ids
        n = next((i for i, p in enumerate(self.tree_parents) if p != i - 1), len(self.tree_parents))
        return self.token_ids[:n]


EMPTY_DRAFT = Draft(token_ids=[])


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix (fast path: `b` extends `a`).

    Incremental proposers call this every round to reconcile their cached tokens with the
    verifier's accepted context; slice compares run in C, so the usual case (`b` extends
    `a`) costs one compare and a mismatch costs O(log n) of them.
    """
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@runtime_checkable
class Proposer(Protocol):
    """Per-session drafter."""

    def propose(self, context_ids: Sequence[int], k: int) -> Draft:
        """Up to k draft tokens continuing `context_ids` (fewer, or none, is allowed)."""
        ...

    def update(self, num_accepted: int) -> None:
        """How many of the last draft's tokens the target accepted."""
        ...

    def set_params(self, params: dict[str, float]) -> None:
        """Per-session drafter parameters chosen by the verifier's policy; **sticky**: a key
        keeps its value until it is set again, so callers pass only what changed (passing
        everything again is harmless). Keys (nested `sorted` drafters):

        - `fixed_exit`: >= 0 pins every draft token to that exit (deeper layers never run);
          < 0 unpins it (the thresholds decide again);
        - `threshold.<exit>`: confidence threshold of that exit (the top probability of the
          exit's distribution must reach it; > 1 = never leave there). Exits without a key
          keep the drafter's default; the deepest exit always emits.

        Proposers without parameters (n-gram, draft model) ignore them (a no-op); one that
        takes parameters raises ValueError for a key or exit it does not know.
        """
        ...

    def close(self) -> None:
        """Free per-session state (KV cache, stream)."""
        ...


@runtime_checkable
class CountingProposer(Proposer, Protocol):
    """A proposer that reports counters of its own with the request's stats
    (`SpecStats.drafter`)."""

    def counters(self) -> dict[str, float]: ...


class ForkableProposer(Proposer, Protocol):
    """A proposer whose cache can be copied (`card`'s branches, `drafter_service.pool`)."""

    def fork(self) -> ForkableProposer:
        """An independent session starting from a copy of this one's cache and parameters."""
        ...

    def adopt(self, fork: ForkableProposer) -> None:
        """Continue from a fork's cache (the target took the fork's branch)."""
        ...


@runtime_checkable
class PipelinedProposer(Proposer, Protocol):
    """A proposer that drafts elsewhere (the drafter pool): the batched loop asks every
    such row first and collects all drafts by one deadline, so drafts of different rows
    are computed at the same time instead of one after another."""

    # True after a `request` that only sent the drafter a context it was far behind on (a new
    # session, or many tokens decoded plainly since it last drafted): nothing to collect
    # this step, so the row runs plain instead of waiting for the drafter's prefill
    catching_up: bool

    def request(self, context_ids: Sequence[int], k: int) -> None:
        """Start drafting up to k tokens after `context_ids`; returns at once."""
        ...

    def collect(self, deadline: float) -> Draft:
        """The requested draft once it arrives, or an empty draft at `deadline`
        (`time.monotonic()`); what already arrived counts even past the deadline."""
        ...

    def take_compute_s(self) -> float:
        """Drafter CPU seconds reported since the last call (`Candidates.compute_s`)."""
        ...


class ProposerFactory(Protocol):
    """Shared state of one proposer kind; makes per-session proposers."""

    method: str

    def new_session(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> Proposer: ...


class DrafterFactory(ProposerFactory, Protocol):
    """A model-based factory the drafter pool serves to every target of its tokenizer."""

    config: DrafterConfig
    tokenizer_hash: str
    vocab_size: int  # valid token ids are [0, vocab_size)
    targets: dict[str, str]  # attached target name -> tokenizer hash

    def attach_target(self, name: str, target_tokenizer_hash: str) -> None:
        """Serve `name` too; ValueError if its tokenizer differs from the drafter's."""
        ...

    def propose_batch(self, requests: Sequence[tuple[Proposer, Sequence[int], int]]) -> list[Draft]:
        """Draft for several of this factory's sessions at once (session, context, k): the
        same drafts as one by one, in one set of forwards."""
        ...
