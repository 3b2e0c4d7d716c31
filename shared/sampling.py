"""Sampling: logits → probabilities (temperature, top-k, top-p) and seeded draws.

The same `SamplingParams` (defined in torch-free `shared.types`, for the router) shape p
(target_probs) and q (draft_probs), so the rejection sampler compares like with like. Draws
use the exponential-race trick (argmax(probs / Exp(1))), which needs no host sync and takes
a per-request `torch.Generator` (gpt-fast's `multinomial_sample_one_no_sync`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from shared.types import SamplingParams


# Draft generators are seeded apart from the target's so the two streams of uniforms differ.
DRAFT_SEED_OFFSET = 0x5EED


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


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


def position_uniforms(
    seeds: Sequence[int],  # [M] a request's seed per position
    positions: Sequence[int],  # [M] the position in the request's sequence being sampled
) -> torch.Tensor:  # [M] float64 in [0, 1)
    """One uniform per (seed, position), the same wherever and whenever it is drawn
    (splitmix64 of the pair): a seeded request's tokens do not depend on what else shares
    its steps or on how many draft tokens a step verified."""
    s = np.asarray(seeds, dtype=np.uint64)
    p = np.asarray(positions, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as splitmix64 wants
        z = s * np.uint64(0x9E3779B97F4A7C15) + (p + np.uint64(1)) * np.uint64(0xD1B54A32D192ED03)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def sample_at(
    logits: torch.Tensor,  # [M, vocab_size] one row per position to sample
    params: Sequence[SamplingParams],  # [R] sampling of each request (row group)
    counts: Sequence[int],  # [R] positions of each request, in order; sum = M
    uniforms: torch.Tensor,  # [M] from `position_uniforms` (ignored for greedy requests)
) -> torch.Tensor:  # [M] int64 the target's token at every position
    """The target's own token at every position: argmax for greedy requests, an inverse-CDF
    draw from p (temperature, top-k, top-p) with the position's uniform for sampled ones.
    Vectorized over positions; one softmax per distinct (temperature, top-p, top-k)."""
    out = logits.argmax(-1)  # [M]
    if all(p.greedy for p in params):
        return out
    row = torch.repeat_interleave(torch.arange(len(params)), torch.tensor(counts))  # [M]
    groups: dict[tuple[float, float, int], list[int]] = {}
    for i, p in enumerate(params):
        if not p.greedy:
            groups.setdefault((p.temperature, p.top_p, p.top_k), []).append(i)
    for members in groups.values():
        index = torch.nonzero(torch.isin(row, torch.tensor(members))).squeeze(1)  # [m]
        probs = logits_to_probs(logits.index_select(0, index), params[members[0]])  # [m, vocab]
        cdf = torch.cumsum(probs, dim=-1)  # [m, vocab]
        u = (uniforms.index_select(0, index).to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)  # [m, 1]
        drawn = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(logits.shape[-1] - 1)
        out.index_copy_(0, index.to(out.device), drawn)
    return out
