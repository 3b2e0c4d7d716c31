"""Verification of draft tokens: every draft is checked against the target's own token.

At each verified position the target chooses its token y exactly as it would without
drafting: the argmax (greedy) or a draw from p (sampling, `shared.sampling.sample_at`). The
draft is accepted up to its first token that differs from y, and y there (or after the last
draft token, the bonus) is emitted too, so every round emits num_accepted + 1 tokens.

Under sampling every draft is treated as deterministic (one-hot q, DESIGN.md): accepting x
iff y == x with y ~ p emits exactly p at every position, whatever drafted x (Leviathan et
al. 2023 with q one-hot). y at a position is an exponential race whose noise depends only
on the request's seed and the position (`shared.sampling.position_noise`; the verifier
seeds every sampled request), so the output is the target's own seeded draw:
the same alone, in any batch, whatever k the load picks and whatever was drafted.

The drafter draws its token at that position with the same noise from q (Gumbel-max
coupling, `drafter_service.nested_model`): where q is close to p the two races pick the
same token (P(same) >= (1 - TV) / (1 + TV)), so acceptance stays near that of rejection
sampling with q, min(1, p/q), which could not be reproducible across k (which uniform meets
which token would depend on where the drafts stop), and no q crosses the wire.
"""

from __future__ import annotations

from collections.abc import Sequence


def accept_prefix(draft_ids: Sequence[int], target_ids: Sequence[int]) -> int:
    """How many leading draft tokens equal the target's tokens (target_ids: [k + 1])."""
    assert len(target_ids) == len(draft_ids) + 1, (len(draft_ids), len(target_ids))
    n = 0
    for d, y in zip(draft_ids, target_ids):
        if d != y:
            break
        n += 1
    return n
