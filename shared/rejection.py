"""Verification of draft tokens: greedy prefix match and lossless rejection sampling.

Vocabulary (vLLM's `RejectionSampler`): *draft* tokens are proposed; *accepted* ones pass;
at the first rejection a *recovered* token is drawn from norm(max(0, target_probs −
draft_probs)); when all k drafts pass, a *bonus* token is drawn from target_probs[k].
Every round therefore emits num_accepted + 1 tokens.

Losslessness (Leviathan et al. 2023): accepting x ~ q with probability min(1, p(x)/q(x))
and otherwise sampling the residual yields exactly p. A deterministic draft (argmax,
n-gram, top-K tree node) has one-hot q, so the test reduces to u <= p(x) and the residual
to p with x removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shared.sampling import sample_from_probs


def greedy_accept(
    draft_token_ids: Sequence[int],  # [k]
    target_argmax: torch.Tensor,  # [k + 1], the target's argmax after each verified position
) -> tuple[list[int], int]:
    """Longest prefix of the draft equal to the target's argmax, plus the target's next token.

    Returns (tokens to emit, num_accepted); len(tokens) == num_accepted + 1.
    """
    k = len(draft_token_ids)
    assert target_argmax.shape == (k + 1,), (target_argmax.shape, k)
    target_cpu = target_argmax.tolist()  # the one host sync of the round
    num_accepted = 0
    while num_accepted < k and draft_token_ids[num_accepted] == target_cpu[num_accepted]:
        num_accepted += 1
    return target_cpu[: num_accepted + 1], num_accepted


def rejection_sample(
    draft_token_ids: Sequence[int],  # [k]
    draft_probs: torch.Tensor | None,  # [k, vocab_size] q, or None for one-hot q
    target_probs: torch.Tensor,  # [k + 1, vocab_size] p
    generator: torch.Generator | None = None,
) -> tuple[list[int], int]:
    """Speculative sampling: accepted drafts, then a recovered or bonus token.

    Returns (tokens to emit, num_accepted); len(tokens) == num_accepted + 1.
    """
    k = len(draft_token_ids)
    vocab_size = target_probs.shape[-1]
    assert target_probs.shape == (k + 1, vocab_size), (target_probs.shape, k)
    assert draft_probs is None or draft_probs.shape == (k, vocab_size), draft_probs.shape
    if k == 0:
        return [int(sample_from_probs(target_probs[0], generator))], 0

    draft_ids = torch.tensor(draft_token_ids, dtype=torch.long, device=target_probs.device)
    positions = torch.arange(k, device=target_probs.device)
    p = target_probs[positions, draft_ids]  # [k]
    q = draft_probs[positions, draft_ids] if draft_probs is not None else torch.ones_like(p)
    u = torch.rand(k, generator=generator, device=target_probs.device)
    # accept x with probability min(1, p/q)  <=>  u * q < p  (no division by q).
    # NOTE: strict, because u is in [0, 1) and can be exactly 0: with <= a token the target
    # gives p(x) = 0 (cut by top-k/top-p) would be accepted whenever u == 0.
    accepted = (u * q < p).tolist()  # host sync
    num_accepted = accepted.index(False) if False in accepted else k

    if num_accepted == k:
        extra = sample_from_probs(target_probs[k], generator)  # bonus token
    else:
        i = num_accepted
        q_full = (
            draft_probs[i]
            if draft_probs is not None
            else torch.nn.functional.one_hot(draft_ids[i], vocab_size).to(target_probs.dtype)
        )
        residual = torch.clamp(target_probs[i] - q_full, min=0.0)  # [vocab_size]
        total = residual.sum()
        # NOTE: total == 0 only when p == q where the draft was rejected (probability 0
        # in exact arithmetic); fall back to p, which is then the same distribution.
        residual = residual / total if total > 0 else target_probs[i]
        extra = sample_from_probs(residual, generator)  # recovered token
    return [*draft_token_ids[:num_accepted], int(extra)], num_accepted
