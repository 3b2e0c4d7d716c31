"""The χ² check of sampled output: the joint distribution of the first two generated tokens
(t1, t2), expected p(t1) p(t2 | t1) from HF forwards with the same sampling transform."""

from __future__ import annotations

import torch
from scipy.stats import chisquare

from shared.sampling import SamplingParams, logits_to_probs
from tests.exactness import load_reference_model


def expected_joint(target: str, prompt: list[int], params: SamplingParams) -> dict[tuple[int, int], float]:
    hf, _ = load_reference_model(target)
    with torch.inference_mode():
        p1 = logits_to_probs(hf(torch.tensor([prompt])).logits[0, -1], params)
        joint = {}
        for t1 in p1.nonzero().flatten().tolist():
            p2 = logits_to_probs(hf(torch.tensor([prompt + [t1]])).logits[0, -1], params)
            for t2 in p2.nonzero().flatten().tolist():
                joint[(t1, t2)] = float(p1[t1] * p2[t2])
    return joint


def assert_matches_joint(counts: dict[tuple[int, int], int], joint: dict[tuple[int, int], float], label: str) -> None:
    """Observed pair counts against `joint`: no impossible pair, and χ² p > 1e-3."""
    assert set(counts) <= set(joint), f"{label}: impossible pairs {set(counts) - set(joint)}"
    num_samples = sum(counts.values())
    cells = sorted(joint)
    observed = [counts.get(c, 0) for c in cells]
    expected = [joint[c] * num_samples for c in cells]
    # merge cells expected < 5 into one so χ² is valid
    small = [i for i, e in enumerate(expected) if e < 5]
    if small:
        observed = [o for i, o in enumerate(observed) if i not in small] + [sum(observed[i] for i in small)]
        expected = [e for i, e in enumerate(expected) if i not in small] + [sum(expected[i] for i in small)]
    scale = sum(observed) / sum(expected)
    result = chisquare(observed, [e * scale for e in expected])
    assert result.pvalue > 1e-3, f"{label}: χ² p={result.pvalue:.2e} observed={observed} expected={expected}"
