"""Sampling: logits → probabilities (temperature, top-k, top-p) and seeded draws.

The same `SamplingParams` (defined in torch-free `shared.types`, for the router) shape p
(target_probs) and q (draft_probs), so the rejection sampler compares like with like. Draws
use the exponential-race trick (argmax(probs / Exp(1))), which needs no host sync and takes
a per-request `torch.Generator` (gpt-fast's `multinomial_sample_one_no_sync`).
"""

from __future__ import annotations

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
