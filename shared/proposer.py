"""The `Proposer` protocol every drafter implements (n-gram, draft model, sorted, card, remote).

A proposer is per session (one generation request). Its factory (`ProposerFactory`) holds
what sessions share: model weights, tables. The verifier's loop calls, once per round:

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

    from shared.sampling import SamplingParams


@dataclass(slots=True)
class Draft:
    """Candidates for one round.

    `draft_probs is None` means the draft was chosen deterministically (argmax, n-gram,
    top-K tree node): its q is one-hot, whatever probability the drafter computed.
    """

    token_ids: list[int]  # [k]
    draft_probs: torch.Tensor | None = None  # [k, vocab_size], q after temperature/top-p/top-k
    info: dict[str, float] = field(default_factory=dict)  # proposer-specific stats (exit depths)

    def __len__(self) -> int:
        return len(self.token_ids)


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

    def close(self) -> None:
        """Free per-session state (KV cache, stream)."""
        ...


class ProposerFactory(Protocol):
    """Shared state of one proposer kind; makes per-session proposers."""

    method: str

    def new_session(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> Proposer: ...
