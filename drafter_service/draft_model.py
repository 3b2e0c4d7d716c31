"""`draft_model`: a small causal LM of the target's tokenizer, classic speculative sampling.

A plain draft model is a nested drafter with a single exit at its last layer, so it runs on
`nested_model.NestedDrafter` (the lean `shared.llama` forward, fp16 one-row matmuls, a
preallocated cache per session, cross-session batching through `propose_batch`) with the
sessions of `nested.NestedProposer`: `propose(context, k)` reconciles the cache with the
verifier's accepted context (longest common prefix), then drafts k tokens. Greedy sessions
draft by argmax (`draft_probs=None`: q is one-hot); sampled sessions draw from q (the
target's temperature/top-p/top-k) with a per-session seeded generator and return q.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from drafter_service.nested import NestedProposerFactory
from drafter_service.nested_model import NestedDrafter
from shared.loading import DTYPES, load_model, tokenizer_hash

if TYPE_CHECKING:
    from shared.config import DrafterConfig


class DraftModelProposerFactory(NestedProposerFactory):
    method = "draft_model"

    def __init__(self, config: DrafterConfig) -> None:
        model = load_model(config)
        drafter = NestedDrafter(model, [model.config.num_hidden_layers], DTYPES[config.matmul_dtype])
        del model  # the drafter keeps its own packed copies of the weights
        super().__init__(config, drafter, tokenizer_hash(config.model_dir), {})
