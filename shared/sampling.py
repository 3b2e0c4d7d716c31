"""Sampling: logits → probabilities (temperature, top-k, top-p) and draws.

The same `SamplingParams` (defined in torch-free `shared.types`, for the router) shape p
(the target's) and q (a drafter's). Draws are exponential races, argmax(probs / E) with
E ~ Exp(1) per token (no host sync). The target's draws (`sample_at`) and seeded drafters'
take E from `position_noise` (seed, position): reproducible whatever shares the step, and
common to target and drafter. Unseeded drafter sessions draw E at random
(`sample_from_probs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from shared.types import SamplingParams


def logits_to_probs(
    logits: torch.Tensor,  # [..., vocab_size]
    params: SamplingParams,
) -> torch.Tensor:  # [..., vocab_size], float32, rows sum to 1
    """Sampling distribution after temperature, top-k and top-p (greedy: one-hot argmax)."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True)
        # NOTE: keep a token while the mass *before* it is < top_p, so the top token always stays.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from_probs(
    probs: torch.Tensor,  # [..., vocab_size]
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # [...], int64
    """One draw per row without a host sync: argmax(probs / E), E ~ Exp(1)."""
    exp = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / exp, dim=-1)


def _mix(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): a generator seed per position."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xD1B54A32D192ED03) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def position_noise(
    seeds: Sequence[int],  # [M] a request's seed per position
    positions: Sequence[int],  # [M] the position in the request's sequence being sampled
    vocab_size: int,
) -> torch.Tensor:  # [M, vocab_size] float32, Exp(1)
    """Exponential noise per (seed, position, token), the same wherever and whenever it is
    drawn: argmax(p / E) is a draw from p (the exponential race), so a seeded request's
    tokens do not depend on what shares its steps or on how many drafts a step verified,
    and a drafter drawing argmax(q / E) with the same E proposes the target's own draw
    wherever q is close to p (Gumbel-max coupling; P(same) >= (1 - TV) / (1 + TV)).

    NOTE: one generator seeding per position (about 10 us each): the sampled positions of
    a step, not its tokens x vocabulary, are what this loops over."""
    out = torch.empty(len(seeds), vocab_size)
    generator = torch.Generator()
    for row, (seed, position) in enumerate(zip(seeds, positions)):
        generator.manual_seed(_mix(seed, position))
        out[row].exponential_(1.0, generator=generator)
    return out


def sample_at(
    logits: torch.Tensor,  # [M, vocab_size] one row per position to sample
    params: Sequence[SamplingParams],  # [R] sampling of each request (row group); sampled ones seeded
    counts: Sequence[int],  # [R] positions of each request, in order; sum = M
    first_positions: Sequence[int],  # [R] position of each request's first row
    offsets: Sequence[int] | None = None,  # [M] each row's position - its request's first; None: 0, 1, ...
) -> torch.Tensor:  # [M] int64 the target's token at every position
    """The target's own token at every position: argmax for greedy requests, the exponential
    race argmax(p / E) with the (seed, position) noise for sampled ones (p after
    temperature, top-k, top-p). One softmax per distinct (temperature, top-p, top-k).
    `offsets` place a tree's rows: nodes of one depth share a position (and its noise)."""
    out = logits.argmax(-1)  # [M]
    if all(p.greedy for p in params):
        return out
    starts = np.cumsum([0, *counts[:-1]])
    groups: dict[tuple[float, float, int], list[int]] = {}
    for i, p in enumerate(params):
        if not p.greedy:
            groups.setdefault((p.temperature, p.top_p, p.top_k), []).append(i)
    for members in groups.values():
        index = torch.tensor([starts[i] + j for i in members for j in range(counts[i])], dtype=torch.long)  # [m]
        seeds = [params[i].seed for i in members for _ in range(counts[i])]
        if offsets is None:
            positions = [first_positions[i] + j for i in members for j in range(counts[i])]
        else:
            positions = [first_positions[i] + offsets[starts[i] + j] for i in members for j in range(counts[i])]
        probs = logits_to_probs(logits.index_select(0, index), params[members[0]])  # [m, vocab]
        noise = position_noise(seeds, positions, logits.shape[-1])  # [m, vocab]
        out.index_copy_(0, index.to(out.device), torch.argmax(probs / noise, dim=-1))
    return out


def with_seed(params: SamplingParams) -> SamplingParams:
    """`params` with a random seed when it samples without one: the target's draws and the
    drafter's then share their (seed, position) noise."""
    if params.greedy or params.seed is not None:
        return params
    import secrets

    return dataclasses.replace(params, seed=secrets.randbits(63))
