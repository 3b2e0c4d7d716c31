"""The lean Llama forward (`shared.llama`) on the target path: logits within 1e-4 of HF's for
a prefill and for verify forwards after rollbacks, on both demo targets; a ragged batch of
rows (different lengths, drafts, rollbacks, slot reuse) gives each row its batch-1 logits."""

from __future__ import annotations

import pytest
import torch

from shared.llama import LlamaForward, LlamaWeights, RowFeed
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


def one_row(lean, cache, ids, num_logits=None, slot=0):  # [num_logits, vocab]
    return lean.step(cache, [RowFeed(slot, ids, len(ids) if num_logits is None else num_logits)])


def test_prefill_and_verify_after_rollback_match_hf(models):
    hf, lean, tokenizer = models
    prompt = tokenizer(humaneval_prompts(1, offset=3)[0]).input_ids
    cont = hf_logits(hf, prompt)[-1].argmax().item()
    cache = lean.new_cache(2, 512)
    ours = one_row(lean, cache, prompt, slot=1)  # [n, vocab]
    ref = hf_logits(hf, prompt)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max() < TOLERANCE
    # verify 4 tokens, reject 3 of them, verify 4 others from the kept prefix (twice)
    tokens = list(prompt)
    for step, draft in enumerate(([cont, 5, 6, 7], [9, 10, 11, 12], [13, 14, 15, 16])):
        out = one_row(lean, cache, draft, slot=1)  # [4, vocab]
        ref = hf_logits(hf, tokens + draft)[-4:]
        assert (out - ref).abs().max() < TOLERANCE, step
        tokens.append(draft[0])
        lean.rollback(cache, 1, len(tokens))
    assert cache.lengths == [0, len(prompt) + 3]


def test_ragged_batch_equals_each_row_alone(models):
    """Hand-built rows: a prompt chunk, a one-token step, verify rows of different draft
    lengths, rows after rollbacks, rows whose slots are one dense run in another order, and
    a reused slot, all in the same steps."""
    hf, lean, tokenizer = models
    prompts = [tokenizer(p).input_ids for p in humaneval_prompts(4)]
    prompts = [p[:n] for p, n in zip(prompts, (40, 7, 23, 60))]
    batched, alone = lean.new_cache(5, 256), lean.new_cache(5, 256)
    # slots 3, 0, 4, 1: not in the rows' order, slot 2 unused
    # step 1: full prefills of rows 0 and 1, the first half of row 2's prompt; row 3 waits
    steps = [
        [RowFeed(3, prompts[0], 1), RowFeed(0, prompts[1], 3), RowFeed(4, prompts[2][:12], 0)],
        [RowFeed(3, [11, 12, 13, 14], 4), RowFeed(0, [7], 1), RowFeed(4, prompts[2][12:], 2),
         RowFeed(1, prompts[3], 1)],  # fmt: skip
        [RowFeed(3, [21, 22], 2), RowFeed(0, [8, 9, 10, 11, 12, 13], 6), RowFeed(1, [5], 1)],
        # slots that are one dense run, out of order (attention reads the cache through a view)
        [RowFeed(1, [6, 7], 2), RowFeed(0, [14], 1)],
        [RowFeed(4, [31, 32, 33], 3), RowFeed(3, [24], 1)],
    ]
    rollbacks = [{}, {3: len(prompts[0]) + 1, 0: len(prompts[1]) + 1}, {0: len(prompts[1]) + 3}, {1: len(prompts[3]) + 2}, {}]
    for feeds, keep in zip(steps, rollbacks):
        out = lean.step(batched, feeds)  # [sum of num_logits, vocab]
        ref = torch.cat([lean.step(alone, [f]) for f in feeds])
        assert out.shape == ref.shape
        assert (out - ref).abs().max() < TOLERANCE
        for slot, n in keep.items():
            lean.rollback(batched, slot, n)
            lean.rollback(alone, slot, n)
    assert batched.lengths == alone.lengths
    # slot reuse: slot 0 restarts from 0 with another prompt beside a running row
    lean.rollback(batched, 0, 0)
    out = lean.step(batched, [RowFeed(0, prompts[3][:30], 30), RowFeed(3, [31], 1)])
    ref_new = hf_logits(hf, prompts[3][:30])
    assert (out[:30] - ref_new).abs().max() < TOLERANCE


def test_last_logits_only_and_a_wrong_weight_is_caught(models):
    hf, lean, tokenizer = models
    ids = tokenizer("def fib(n):\n    ").input_ids
    ref = hf_logits(hf, ids)[-1:]
    assert (one_row(lean, lean.new_cache(1, 64), ids, 1) - ref).abs().max() < TOLERANCE
    # the comparison can fail: a perturbed weight moves the logits far beyond the tolerance
    broken = LlamaForward(LlamaWeights(hf))
    layer = broken.weights.layers[0]
    layer.wo = broken.weights._pack_matrix(layer.wo.small * 1.01)  # every copy of it (oneDNN's too)
    assert (one_row(broken, broken.new_cache(1, 64), ids, 1) - ref).abs().max() > TOLERANCE


def test_fp16_matmuls_stay_close():
    hf, tokenizer = load_reference_model("codelm-target-s")
    lean = LlamaForward(LlamaWeights(hf, matmul_dtype=torch.float16))
    ids = tokenizer("def add(a, b):\n    return").input_ids
    diff = (one_row(lean, lean.new_cache(1, 64), ids) - hf_logits(hf, ids)).abs().max()
    assert diff < 0.1  # fp16 weights move logits by ~1e-2: acceptance only, never output


def test_from_pretrained_loads_a_directory():
    hf, tokenizer = load_reference_model("codelm-target-s")
    lean = LlamaForward.from_pretrained(models_dir() / "codelm-target-s")
    assert lean.weights.num_layers == hf.config.num_hidden_layers
    assert lean.weights.dtype == torch.float32  # the checkpoint's dtype
    ids = tokenizer("import os").input_ids
    assert (one_row(lean, lean.new_cache(1, 16), ids) - hf_logits(hf, ids)).abs().max() < TOLERANCE


# a tree after the pending token (index 0): line 0-1-2-3, alternatives 4 (sibling of 1),
# 5 (sibling of 2) and 6 (a child of the alternative 4)
TREE_PARENTS = [-1, 0, 1, 2, 0, 1, 4]
TREE_TOKENS = [50, 61, 62, 63, 71, 72, 81]


def _paths(parents):
    """Root-to-node feed indices of every node."""
    out = []
    for i, p in enumerate(parents):
        out.append([*(out[p] if p >= 0 else []), i])
    return out


@pytest.mark.parametrize("batched", [False, True])
def test_tree_feed_equals_each_path_alone(models, batched):
    """Each node's logits in one tree feed equal those of its root-to-node path fed as a
    chain; keep_path then leaves the cache as if only the accepted path had been fed."""
    hf, lean, tokenizer = models
    prompt = tokenizer(humaneval_prompts(1, offset=5)[0]).input_ids[:30]
    other = tokenizer(humaneval_prompts(1, offset=6)[0]).input_ids[:17]
    cache = lean.new_cache(2, 128)
    lean.step(cache, [RowFeed(0, prompt, 0), RowFeed(1, other, 0)])
    feeds = [RowFeed(0, TREE_TOKENS, len(TREE_TOKENS), TREE_PARENTS)]
    if batched:  # after a chain row with a different length: slot order is not feed order
        feeds.insert(0, RowFeed(1, [5, 6, 7], 3))
    out = lean.step(cache, feeds)[3 if batched else 0 :][: len(TREE_TOKENS)]  # [7, vocab]
    for i, path in enumerate(_paths(TREE_PARENTS)):
        ref = hf_logits(hf, prompt + [TREE_TOKENS[j] for j in path])[-1]
        assert (out[i] - ref).abs().max() < TOLERANCE, (i, path)
    # accept the path 0 -> 4 -> 6 (off the first branch): the cache holds prompt + its tokens
    lean.keep_path(cache, 0, len(prompt), [0, 4, 6])
    assert cache.lengths[0] == len(prompt) + 3
    nxt = one_row(lean, cache, [90], slot=0)[0]
    ref = hf_logits(hf, prompt + [50, 71, 81, 90])[-1]
    assert (nxt - ref).abs().max() < TOLERANCE
