"""`draft_model`: a small causal LM of the target's tokenizer, classic speculative sampling.

One `DraftModelProposerFactory` holds the weights; each session has its own KV cache.
`propose(context, k)` first reconciles the cache with the verifier's accepted context
(keep the longest common prefix, drop the rest, feed the new tail), then drafts k tokens
autoregressively. Greedy sessions draft by argmax (deterministic: `draft_probs=None`, q is
one-hot); sampled sessions draw from q (same temperature/top-p/top-k as the target) with a
per-session seeded generator and return q for the rejection sampler.

Two engines behind the same sessions:
- lean (default for Llama-architecture drafters): a plain model is a nested drafter with a
  single exit at its last layer, so it runs on `sorted_model.SortedDrafter` (fused fp16
  one-row matmuls, preallocated cache, cross-session batching via `propose_batch`);
- HF (`DraftModelProposer`): the generic `AutoModelForCausalLM` forward with a
  `DynamicCache`, for architectures the lean forward does not cover.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from shared.loading import load_model, tokenizer_hash
from shared.proposer import Draft, common_prefix_len
from shared.sampling import SamplingParams, logits_to_probs, make_generator, sample_from_probs

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from shared.config import DrafterConfig

log = logging.getLogger(__name__)

# Draft generators are seeded apart from the target's so the two streams of uniforms differ.
DRAFT_SEED_OFFSET = 0x5EED
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DraftModelProposer:
    """A session on HF's generic forward (fallback engine)."""

    def __init__(self, model: PreTrainedModel, sampling: SamplingParams) -> None:
        from transformers import DynamicCache

        self.model = model
        self.sampling = sampling
        seed = None if sampling.seed is None else sampling.seed + DRAFT_SEED_OFFSET
        self.generator = make_generator(seed, model.device)
        self.cache = DynamicCache(config=model.config)
        self.cached_ids: list[int] = []  # tokens whose KV entries are in `cache`

    def propose(self, context_ids: Sequence[int], k: int) -> Draft:
        if k <= 0 or not context_ids:
            return Draft(token_ids=[])
        with torch.inference_mode():
            return self._propose(context_ids, k)

    def _propose(self, context_ids: Sequence[int], k: int) -> Draft:
        keep = min(common_prefix_len(self.cached_ids, context_ids), len(context_ids) - 1)
        if keep < len(self.cached_ids):
            self.cache.crop(keep - len(self.cached_ids))  # negative: drop the tail
        feed = torch.tensor([context_ids[keep:]], dtype=torch.long, device=self.model.device)
        self.cached_ids = list(context_ids)

        draft: list[torch.Tensor] = []  # k x [1] token ids, kept on device until the end
        probs: list[torch.Tensor] = []  # k x [vocab_size]
        for i in range(k):
            logits = self.model(
                input_ids=feed, past_key_values=self.cache, use_cache=True, logits_to_keep=1
            ).logits[0, -1]  # [vocab_size]
            if self.sampling.greedy:
                token = logits.argmax(-1, keepdim=True)  # [1]
            else:
                q = logits_to_probs(logits, self.sampling)  # [vocab_size]
                token = sample_from_probs(q, self.generator).reshape(1)
                probs.append(q)
            draft.append(token)
            if i < k - 1:
                feed = token.view(1, 1)
        token_ids = torch.cat(draft).tolist()  # the one host sync of the draft
        self.cached_ids.extend(token_ids[:-1])  # the last draft token is not fed yet
        return Draft(token_ids=token_ids, draft_probs=torch.stack(probs) if probs else None)

    def update(self, num_accepted: int) -> None:
        pass  # the next propose() reconciles against the verifier's context

    def set_params(self, params: dict[str, float]) -> None:
        pass  # a plain draft model has no per-session knobs

    def close(self) -> None:
        self.cache = None
        self.cached_ids = []


class DraftModelProposerFactory:
    method = "draft_model"

    def __init__(self, config: DrafterConfig) -> None:
        self.config = config
        self.tokenizer_hash = tokenizer_hash(config.model_dir)
        model = load_model(config)
        self.lean = None
        if config.lean_forward:
            from drafter_service.sorted_model import SortedDrafter
            from drafter_service.sorted import SortedProposerFactory

            try:
                drafter = SortedDrafter(
                    model, [model.config.num_hidden_layers], _DTYPES[config.matmul_dtype]
                )
                self.lean = SortedProposerFactory.from_drafter(config, drafter, self.tokenizer_hash)
            except ValueError as e:  # architecture the lean forward does not cover
                log.warning("%s: lean forward unavailable (%s); using HF's forward", config.name, e)
        self.model = None if self.lean is not None else model
        if self.lean is not None:
            self.propose_batch = self.lean.propose_batch

    def new_session(self, prompt_ids: Sequence[int], sampling: SamplingParams):
        if self.lean is not None:
            return self.lean.new_session(prompt_ids, sampling)
        return DraftModelProposer(self.model, sampling)
