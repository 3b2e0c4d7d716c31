"""Target engines: a fixed number of slots (rows), one forward per step over every fed row.

`TargetEngine` (the served one) runs the lean batched forward (`shared.llama.LlamaForward`)
over a `SlotCache` preallocated as `max_batch_rows` x `max_context`: a step feeds each row's
tokens (a prompt chunk, or the pending token plus its draft), rollback lowers a row's
length, a finished row's slot is reused. `HFEngine` has the same interface over Hugging Face's
forward (one `DynamicCache` per slot, one forward per row): the reference for tests, which
the lean engine must match within float tolerance.

Forwards run under `torch.inference_mode()`, entered by the caller's thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from shared.llama import LlamaForward, LlamaWeights, RowFeed
from shared.loading import load_model, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from shared.config import TargetConfig


class Engine(Protocol):
    vocab_size: int
    max_context: int
    max_batch_rows: int
    eos_token_ids: set[int]
    device: torch.device

    def resized(self, max_batch_rows: int) -> Engine: ...  # same weights, its own slots

    def allocate(self) -> int | None: ...  # a free slot, None when all are taken

    def release(self, slot: int) -> None: ...

    def length(self, slot: int) -> int: ...  # positions cached in `slot`

    def step(self, feeds: Sequence[RowFeed]) -> torch.Tensor: ...  # [sum num_logits, vocab]

    def rollback(self, slot: int, num_keep: int) -> None: ...

    # tree feeds (RowFeed.tree_parents); engines without them verify a tree's first branch only
    supports_trees: bool

    def keep_path(self, slot: int, start: int, path: Sequence[int]) -> None: ...


class _Slots:
    """Slot bookkeeping shared by both engines: lowest free slot first (dense slots keep
    the rows' cache reads close together)."""

    def __init__(self, max_batch_rows: int) -> None:
        self.max_batch_rows = max_batch_rows
        self._free = list(range(max_batch_rows - 1, -1, -1))

    def allocate(self) -> int | None:
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        assert slot not in self._free, slot
        self._free.append(slot)
        self._free.sort(reverse=True)

    @property
    def num_free(self) -> int:
        return len(self._free)


class TargetEngine(_Slots):
    def __init__(self, forward: LlamaForward, max_batch_rows: int, max_context: int,
                 eos_token_ids: set[int]) -> None:  # fmt: skip
        super().__init__(max_batch_rows)
        self.forward = forward
        self.device = forward.weights.device
        self.vocab_size = forward.weights.vocab_size
        self.max_context = max_context
        self.eos_token_ids = eos_token_ids
        self.cache = forward.new_cache(max_batch_rows, max_context)

    def resized(self, max_batch_rows: int) -> TargetEngine:
        """Another engine over the same weights with its own `max_batch_rows` slots."""
        return TargetEngine(self.forward, max_batch_rows, self.max_context, self.eos_token_ids)

    def release(self, slot: int) -> None:
        self.cache.lengths[slot] = 0
        super().release(slot)

    def length(self, slot: int) -> int:
        return self.cache.lengths[slot]

    def step(self, feeds: Sequence[RowFeed]) -> torch.Tensor:  # [sum num_logits, vocab]
        return self.forward.step(self.cache, feeds)

    def rollback(self, slot: int, num_keep: int) -> None:
        self.forward.rollback(self.cache, slot, num_keep)

    supports_trees = True

    def keep_path(self, slot: int, start: int, path: Sequence[int]) -> None:
        self.forward.keep_path(self.cache, slot, start, path)


class HFEngine(_Slots):
    """Reference engine: HF's forward, one `DynamicCache` per slot, rows one by one.

    KV rollback: in transformers 5.x `DynamicCache.crop` takes a *negative* count
    (`crop(-n)` drops the last n entries); `crop(positive)` keeps that many."""

    def __init__(self, model: PreTrainedModel, max_batch_rows: int, max_context: int,
                 eos_token_ids: set[int]) -> None:  # fmt: skip
        super().__init__(max_batch_rows)
        self.model = model
        self.device = model.device
        self.vocab_size = model.config.vocab_size
        self.max_context = max_context
        self.eos_token_ids = eos_token_ids
        self._caches: dict[int, object] = {}
        self._lengths = [0] * max_batch_rows

    def resized(self, max_batch_rows: int) -> HFEngine:
        return HFEngine(self.model, max_batch_rows, self.max_context, self.eos_token_ids)

    def release(self, slot: int) -> None:
        self._caches.pop(slot, None)
        self._lengths[slot] = 0
        super().release(slot)

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    def step(self, feeds: Sequence[RowFeed]) -> torch.Tensor:
        from transformers import DynamicCache

        out = []
        for f in feeds:
            cache = self._caches.setdefault(f.slot, DynamicCache(config=self.model.config))
            ids = torch.tensor([list(f.token_ids)], dtype=torch.long, device=self.device)  # [1, t]
            logits = self.model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0]
            self._lengths[f.slot] += len(f.token_ids)
            if f.num_logits:
                out.append(logits[-f.num_logits :])
        return torch.cat(out) if out else torch.empty(0, self.vocab_size, device=self.device)

    def rollback(self, slot: int, num_keep: int) -> None:
        num_drop = self._lengths[slot] - num_keep
        assert num_drop >= 0, (self._lengths[slot], num_keep)
        if num_drop:
            self._caches[slot].crop(-num_drop)
            self._lengths[slot] = num_keep

    supports_trees = False

    def keep_path(self, slot: int, start: int, path: Sequence[int]) -> None:
        assert list(path) == list(range(len(path))), "the reference engine feeds chains only"
        self.rollback(slot, start + len(path))


def load_target(
    config: TargetConfig, max_batch_rows: int = 1, reference: bool = False
) -> tuple[Engine, PreTrainedTokenizerBase]:
    """The target's engine (`reference`: the HF one) with `max_batch_rows` slots."""
    model = load_model(config)
    tokenizer = load_tokenizer(config.model_dir)
    max_context = config.max_context or model.config.max_position_embeddings
    max_context = min(max_context, model.config.max_position_embeddings)
    eos = model.generation_config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    if reference:
        return HFEngine(model, max_batch_rows, max_context, eos_ids), tokenizer
    forward = LlamaForward(LlamaWeights(model))
    return TargetEngine(forward, max_batch_rows, max_context, eos_ids), tokenizer
