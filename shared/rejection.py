"""Verification of draft tokens: every draft is checked against the target's own token.

At each verified position the target chooses its token y exactly as it would without
drafting: the argmax (greedy) or a draw from p (sampling, `shared.sampling.sample_at`). The
draft is accepted up to its first token that differs from y, and y there (or after the last
draft token, the bonus) is emitted too, so every round emits num_accepted + 1 tokens.

Under sampling this treats every draft as deterministic (one-hot q, DESIGN.md): accepting x
iff y == x with y ~ p emits exactly p at every position, whatever drafted x (Leviathan et al.
2023 with q one-hot: the test u <= p(x) and the residual p without x are the same draw as
y ~ p). Why not min(1, p/q) with the drafter's q, which accepts more from a sampling drafter:
the batched scheduler chooses k by load, and with q-tests which uniform meets which token
depends on k, so a seeded request would change with the load. Here y at a position depends
only on (seed, position) and p, so a seeded request is reproducible alone or in any batch
(`tests/verifier_service/test_sampling.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.types import SamplingParams

# What a verifier asks its drafters for, whatever the request's sampling: the argmax of q.
# Accepted iff it equals y ~ p, a draft x passes with probability p(x), so the drafter's
# best guess is its most likely token (for q close to p, max p >= sum p^2, what a sampled
# draft would get), and no q needs computing or shipping.
DRAFT_SAMPLING = SamplingParams()


def accept_prefix(draft_ids: Sequence[int], target_ids: Sequence[int]) -> int:
    """How many leading draft tokens equal the target's tokens (target_ids: [k + 1])."""
    assert len(target_ids) == len(draft_ids) + 1, (len(draft_ids), len(target_ids))
    n = 0
    for d, y in zip(draft_ids, target_ids):
        if d != y:
            break
        n += 1
    return n
