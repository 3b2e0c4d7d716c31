"""The target engine: one HF causal LM, one KV cache per session, rollback by crop.

The engine is stateless across sessions: a `TargetSession` owns its `DynamicCache`, so
several sessions run concurrently on one set of weights (each in its own executor thread).
Forwards run under `torch.inference_mode()`, entered by the caller's thread.

KV rollback: in transformers 5.x `DynamicCache.crop` takes a *negative* count
(`crop(-n)` drops the last n entries); `crop(positive)` keeps that many.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from shared.loading import load_model, load_tokenizer

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

    from shared.config import TargetConfig


@dataclass(slots=True)
class TargetSession:
    cache: DynamicCache
    num_cached: int = 0  # KV entries in `cache` (= tokens fed so far, after rollbacks)
    extra: dict = field(default_factory=dict)


class TargetEngine:
    def __init__(self, model: PreTrainedModel, max_context: int, eos_token_ids: set[int]) -> None:
        self.model = model
        self.device = model.device
        self.vocab_size: int = model.config.vocab_size
        self.max_context = max_context
        self.eos_token_ids = eos_token_ids

    def new_session(self) -> TargetSession:
        from transformers import DynamicCache

        return TargetSession(cache=DynamicCache(config=self.model.config))

    def forward(
        self,
        session: TargetSession,
        input_ids: list[int],  # [n] tokens after the session's cached prefix
        last_only: bool = False,
    ) -> torch.Tensor:  # [n, vocab_size] logits (or [1, vocab_size] when last_only)
        """Append `input_ids` to the session's cache and return their next-token logits."""
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)  # [1, n]
        out = self.model(
            input_ids=ids,
            past_key_values=session.cache,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
        session.num_cached += len(input_ids)
        return out.logits[0]

    def rollback(self, session: TargetSession, num_keep: int) -> None:
        """Drop KV entries past the first `num_keep` (rejected draft positions)."""
        num_drop = session.num_cached - num_keep
        assert num_drop >= 0, (session.num_cached, num_keep)
        if num_drop:
            session.cache.crop(-num_drop)
            session.num_cached = num_keep


def load_target(config: TargetConfig) -> tuple[TargetEngine, PreTrainedTokenizerBase]:
    model = load_model(config)
    tokenizer = load_tokenizer(config.model_dir)
    max_context = config.max_context or model.config.max_position_embeddings
    max_context = min(max_context, model.config.max_position_embeddings)
    eos = model.generation_config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return TargetEngine(model, max_context, eos_ids), tokenizer
