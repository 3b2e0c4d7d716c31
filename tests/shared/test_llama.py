"""The lean Llama forward (`shared.llama`) on the target path: logits within 1e-4 of HF's
for a prefill and for verify forwards after rollbacks, on both demo targets."""

from __future__ import annotations

import pytest
import torch

from shared.llama import LlamaForward, LlamaWeights
from shared.paths import models_dir
from tests.exactness import humaneval_prompts, load_reference_model

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["codelm-target-s", "codelm-target-m"])
def models(request):
    hf, tokenizer = load_reference_model(request.param)
    return hf, LlamaForward(LlamaWeights(hf)), tokenizer


def hf_logits(hf, ids: list[int]) -> torch.Tensor:  # [len(ids), vocab]
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0]


def test_prefill_and_verify_after_rollback_match_hf(models):
    hf, lean, tokenizer = models
    prompt = tokenizer(humaneval_prompts(1, offset=3)[0]).input_ids
    cont = hf_logits(hf, prompt)[-1].argmax().item()
    cache = lean.new_cache(512)
    ours = lean.forward(cache, prompt)  # [n, vocab]
    ref = hf_logits(hf, prompt)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max() < TOLERANCE
    # verify 4 tokens, reject 3 of them, verify 4 others from the kept prefix (twice)
    tokens = list(prompt)
    for step, draft in enumerate(([cont, 5, 6, 7], [9, 10, 11, 12], [13, 14, 15, 16])):
        out = lean.forward(cache, draft)  # [4, vocab]
        ref = hf_logits(hf, tokens + draft)[-4:]
        assert (out - ref).abs().max() < TOLERANCE, step
        tokens.append(draft[0])
        lean.rollback(cache, len(tokens))
    assert cache.length == len(prompt) + 3


def test_last_only_and_a_wrong_weight_is_caught(models):
    hf, lean, tokenizer = models
    ids = tokenizer("def fib(n):\n    ").input_ids
    ref = hf_logits(hf, ids)[-1:]
    assert (lean.forward(lean.new_cache(64), ids, last_only=True) - ref).abs().max() < TOLERANCE
    # the comparison can fail: a perturbed weight moves the logits far beyond the tolerance
    broken = LlamaForward(LlamaWeights(hf))
    wo = broken.weights.layers[0].wo
    wo.small = wo.small * 1.01  # a new tensor: the packed fp32 weights alias the HF model's
    assert (broken.forward(broken.new_cache(64), ids, last_only=True) - ref).abs().max() > TOLERANCE


def test_fp16_matmuls_stay_close():
    hf, tokenizer = load_reference_model("codelm-target-s")
    lean = LlamaForward(LlamaWeights(hf, matmul_dtype=torch.float16))
    ids = tokenizer("def add(a, b):\n    return").input_ids
    diff = (lean.forward(lean.new_cache(64), ids) - hf_logits(hf, ids)).abs().max()
    assert diff < 0.1  # fp16 weights move logits by ~1e-2: acceptance only, never output


def test_from_pretrained_loads_a_directory():
    hf, tokenizer = load_reference_model("codelm-target-s")
    lean = LlamaForward.from_pretrained(models_dir() / "codelm-target-s")
    assert lean.weights.num_layers == hf.config.num_hidden_layers
    assert lean.weights.dtype == torch.float32  # the checkpoint's dtype
    ids = tokenizer("import os").input_ids
    assert (lean.forward(lean.new_cache(16), ids) - hf_logits(hf, ids)).abs().max() < TOLERANCE
