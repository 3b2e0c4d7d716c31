"""The speculative decoding loop of one request (transport-free; gpt-fast's
`speculative_decode` in a loop).

State between rounds: `tokens` = prompt + everything emitted; the target's KV cache holds
all of them but the last (the *pending* token, fed at the start of the next round).
One round:

    k, params = policy.plan([row])                           # this request is a one-row step
    draft   = proposer.propose(tokens, k)                    # k draft tokens (maybe fewer)
    logits  = target.forward([pending, *draft])              # [k + 1, vocab], one forward
    emitted = accept(draft, logits)                          # num_accepted + 1 tokens
    rollback the KV entries of rejected drafts; emitted[-1] becomes the new pending token
    policy.observe([row], [outcome], step cost)

k = 0 is an ordinary decoding step through the same code. The loop is a synchronous
generator (run it in an executor thread); `close()` on it aborts the request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from shared.detokenize import IncrementalDetokenizer
from shared.proposer import EMPTY_DRAFT, Draft, Proposer
from shared.rejection import greedy_accept, rejection_sample
from shared.sampling import logits_to_probs, make_generator, sample_from_probs
from shared.stop import StopChecker
from shared.types import FinishReason, GenerationChunk, GenerationRequest, GenerationResult, SpecStats
from verifier_service.policy import RowOutcome, StepCost

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from verifier_service.engine import TargetEngine
    from verifier_service.policy import SpeculationPolicy

logger = logging.getLogger(__name__)


class SpecDecodeLoop:
    def __init__(
        self, engine: TargetEngine, tokenizer: PreTrainedTokenizerBase, policy: SpeculationPolicy
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.policy = policy

    def generate(
        self, request: GenerationRequest, proposer: Proposer | None
    ) -> Iterator[GenerationChunk | GenerationResult]:
        with torch.inference_mode():
            yield from self._generate(request, proposer)

    def _generate(
        self, request: GenerationRequest, proposer: Proposer | None
    ) -> Iterator[GenerationChunk | GenerationResult]:
        engine = self.engine
        sampling = request.sampling
        generator = make_generator(sampling.seed, engine.device)
        policy = self.policy
        row = policy.start(request)
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_ids)
        stop = StopChecker(request.stop)
        stats = SpecStats()
        tokens = list(request.prompt_ids)
        num_prompt = len(tokens)
        max_total = min(engine.max_context, num_prompt + request.max_new_tokens)
        eos_ids = engine.eos_token_ids
        session = engine.new_session()
        text_parts: list[str] = []

        t0 = time.perf_counter()
        logits = engine.forward(session, tokens, last_only=True)  # [1, vocab]
        t1 = time.perf_counter()
        stats.target_time_s += t1 - t0
        emitted = self._sample(logits, sampling, generator)
        try:
            while True:
                t_round = time.perf_counter()
                # --- emit: cut at EOS / max tokens, detokenize, stop strings
                hit_eos = False
                for i, tok in enumerate(emitted):
                    if tok in eos_ids:
                        emitted, hit_eos = emitted[: i + 1], True
                        break
                room = max_total - len(tokens)
                if len(emitted) > room:
                    emitted, hit_eos = emitted[:room], False
                done = hit_eos or len(emitted) == room
                finish = FinishReason.STOP if hit_eos else FinishReason.LENGTH
                tokens.extend(emitted)
                visible = [t for t in emitted if t not in eos_ids]
                text, stopped = stop.feed(detok.add(visible))
                if stopped:
                    finish, done = FinishReason.STOP, True
                if done:
                    text += "" if stopped else stop.flush()
                text_parts.append(text)
                stats.other_time_s += time.perf_counter() - t_round
                yield GenerationChunk(token_ids=emitted, text=text)
                if done:
                    break

                # --- draft
                t_draft = time.perf_counter()
                plan = policy.plan([row])[0]
                # The verify forward writes len(tokens) + k positions; emitted tokens stop at max_total.
                k = min(plan.k, max_total - len(tokens) - 1)
                if proposer is not None and k > 0:
                    if plan.params is not None:
                        proposer.set_params(plan.params)
                    draft = proposer.propose(tokens, k)
                else:
                    draft = EMPTY_DRAFT
                if draft.token_ids and not self._well_formed(draft):
                    draft = EMPTY_DRAFT  # a faulty drafter costs speculation, never the request
                draft_ids = draft.token_ids[:k] if k > 0 else []
                t_verify = time.perf_counter()
                stats.draft_time_s += t_verify - t_draft

                # --- verify: one forward over [pending, *draft]
                logits = engine.forward(session, [tokens[-1], *draft_ids])  # [k + 1, vocab]
                t_accept = time.perf_counter()
                stats.target_time_s += t_accept - t_verify
                if sampling.greedy:
                    emitted, num_accepted = greedy_accept(draft_ids, logits.argmax(-1))
                else:
                    draft_probs = draft.draft_probs[: len(draft_ids)] if draft.draft_probs is not None else None
                    target_probs = logits_to_probs(logits, sampling)  # [k + 1, vocab]
                    emitted, num_accepted = rejection_sample(draft_ids, draft_probs, target_probs, generator)
                engine.rollback(session, len(tokens) + num_accepted)

                # --- bookkeeping
                num_draft = len(draft_ids)
                policy.observe([row], [RowOutcome(num_draft, num_accepted)],
                               StepCost(1, num_draft + 1, t_accept - t_verify))  # fmt: skip
                stats.num_rounds += 1
                if num_draft:
                    stats.observe_round(num_draft, num_accepted, draft.exit_layers)
                    proposer.update(num_accepted)
                stats.other_time_s += time.perf_counter() - t_accept
        finally:
            if proposer is not None:
                proposer.close()
            stats.policy = policy.summary(row)

        yield GenerationResult(
            finish_reason=finish,
            prompt_tokens=num_prompt,
            completion_tokens=len(tokens) - num_prompt,
            token_ids=tokens[num_prompt:],
            text="".join(text_parts),
            stats=stats,
        )

    def _well_formed(self, draft: Draft) -> bool:
        """Draft token ids inside the target's vocabulary, q (if any) over that vocabulary."""
        vocab = self.engine.vocab_size
        ok = 0 <= min(draft.token_ids) and max(draft.token_ids) < vocab and (
            draft.draft_probs is None or tuple(draft.draft_probs.shape) == (len(draft.token_ids), vocab)
        )
        if not ok:
            logger.warning("malformed draft dropped (token ids outside [0, %d) or draft_probs shape)", vocab)
        return ok

    @staticmethod
    def _sample(
        logits: torch.Tensor,  # [1, vocab_size]
        sampling,
        generator: torch.Generator | None,
    ) -> list[int]:
        if sampling.greedy:
            return logits.argmax(-1).tolist()
        return sample_from_probs(logits_to_probs(logits, sampling), generator).tolist()
