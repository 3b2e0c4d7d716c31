"""`draft_model`: a small causal LM of the target's tokenizer, classic speculative sampling.

One `DraftModelProposerFactory` holds the weights; each session has its own KV cache.
`propose(context, k)` first reconciles the cache with the verifier's accepted context
(keep the longest common prefix, `crop` the rest, feed the new tail), then drafts k tokens
autoregressively. Greedy sessions draft by argmax (deterministic: `draft_probs=None`, q is
one-hot); sampled sessions draw from q (same temperature/top-p/top-k as the target) with a
per-session seeded generator and return q for the rejection sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from shared.loading import load_model, tokenizer_hash
from shared.proposer import Draft, common_prefix_len
from shared.sampling import SamplingParams, logits_to_probs, make_generator, sample_from_probs

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from shared.config import DrafterConfig

# Draft generators are seeded apart from the target's so the two streams of uniforms differ.
DRAFT_SEED_OFFSET = 0x5EED


class DraftModelProposer:
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

    def close(self) -> None:
        self.cache = None
        self.cached_ids = []


class DraftModelProposerFactory:
    method = "draft_model"

    def __init__(self, config: DrafterConfig) -> None:
        self.config = config
        self.model = load_model(config)
        self.tokenizer_hash = tokenizer_hash(config.model_dir)

    def new_session(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> DraftModelProposer:
        return DraftModelProposer(self.model, sampling)
