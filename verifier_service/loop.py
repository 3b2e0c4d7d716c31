"""The speculative decoding loop of one request (transport-free; gpt-fast's
`speculative_decode` in a loop).

State between rounds: `tokens` = prompt + everything emitted; the target's KV cache holds
all of them but the last (the *pending* token, fed at the start of the next round).
One round:

    draft   = proposer.propose(tokens, k)                    # k draft tokens (maybe fewer)
    logits  = target.forward([pending, *draft])              # [k + 1, vocab], one forward
    emitted = accept(draft, logits)                          # num_accepted + 1 tokens
    rollback the KV entries of rejected drafts; emitted[-1] becomes the new pending token

k = 0 is an ordinary decoding step through the same code. The loop is a synchronous
generator (run it in an executor thread); `close()` on it aborts the request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from shared.detokenize import IncrementalDetokenizer
from shared.proposer import EMPTY_DRAFT, Proposer
from shared.rejection import greedy_accept, rejection_sample
from shared.sampling import logits_to_probs, make_generator, sample_from_probs
from shared.stop import StopChecker
from shared.types import FinishReason, GenerationChunk, GenerationRequest, GenerationResult, SpecStats
from verifier_service.exit_policy import SortedExitPolicy
from verifier_service.policy import AdaptiveKPolicy, FixedKPolicy, HeuristicKPolicy, ParamsPolicy

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from shared.config import SpeculationConfig
    from verifier_service.engine import TargetEngine
    from verifier_service.exit_policy import ExitSetup

Policy = AdaptiveKPolicy | FixedKPolicy | HeuristicKPolicy | ParamsPolicy | SortedExitPolicy
_Learnable = (AdaptiveKPolicy, SortedExitPolicy)


class SpecDecodeLoop:
    def __init__(
        self,
        engine: TargetEngine,
        tokenizer: PreTrainedTokenizerBase,
        speculation: SpeculationConfig,
        *,
        exit_setup: ExitSetup | None = None,
    ) -> None:
        """`exit_setup`: what this target's verifier knows about the sorted drafter (exits,
        calibrated threshold vectors); None: method `sorted` adapts k only."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.speculation = speculation
        self.exit_setup = exit_setup
        # (method, pinned drafter params) -> the last finished request's adaptive policy,
        # forked by the next request with the same key
        self._learned: dict[tuple, AdaptiveKPolicy | SortedExitPolicy] = {}

    def make_policy(self, request: GenerationRequest) -> Policy:
        return self._make_policy(request)[0]

    def _make_policy(self, request: GenerationRequest) -> tuple[Policy, tuple | None]:
        """(the request's policy, the key its learned state is kept under; None: not kept)."""
        spec = self.speculation
        pinned = dict(request.drafter_params)
        setup = self.exit_setup if request.method == "sorted" else None
        start = pinned or (setup.start_params if setup is not None else {})
        initial_k = spec.num_speculative_tokens
        if setup is not None and setup.initial_k is not None:
            initial_k = min(setup.initial_k, spec.max_speculative_tokens)

        def with_params(policy):
            return ParamsPolicy(policy, start) if start else policy

        if request.num_speculative_tokens is not None:
            return with_params(FixedKPolicy(request.num_speculative_tokens)), None
        if not spec.adaptive:
            return with_params(FixedKPolicy(spec.num_speculative_tokens)), None
        if request.sampling.seed is not None and not request.sampling.greedy:
            # NOTE: timings must not steer a seeded request: k by acceptance, fixed thresholds
            return with_params(HeuristicKPolicy(initial_k, spec.max_speculative_tokens)), None
        key = (request.method, tuple(sorted(pinned.items())))
        learned = self._learned.get(key)
        if learned is not None:
            policy = learned.fork()
        elif setup is not None and not pinned:
            policy = SortedExitPolicy(setup, initial_k, spec.max_speculative_tokens)
        else:
            policy = AdaptiveKPolicy(initial_k, spec.max_speculative_tokens)
        return (ParamsPolicy(policy, pinned) if pinned else policy), key

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
        policy, learn_key = self._make_policy(request) if proposer is not None else (FixedKPolicy(0), None)
        applied_params: dict[str, float] | None = None  # the params object last given to the proposer
        drafter_caught_up = False  # the last round drafted: the drafter's cache is current
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
                # The verify forward writes len(tokens) + k positions; emitted tokens stop at max_total.
                k = min(policy.next_k(), max_total - len(tokens) - 1)
                if proposer is not None and k > 0:
                    params = policy.params()
                    if params is not applied_params:  # the policy changed them (rare)
                        if params:
                            proposer.set_params(params)
                        applied_params = params
                    draft = proposer.propose(tokens, k)
                else:
                    draft = EMPTY_DRAFT
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
                stats.num_rounds += 1
                exit_layers = None
                if num_draft:
                    stats.num_spec_rounds += 1
                    stats.num_draft_tokens += num_draft
                    stats.num_accepted_tokens += num_accepted
                    per_pos = stats.num_accepted_per_pos
                    if len(per_pos) < num_draft:
                        per_pos.extend([0] * (num_draft - len(per_pos)))
                    for pos in range(num_accepted):
                        per_pos[pos] += 1
                    if draft.exit_layers:
                        exit_layers = draft.exit_layers[:num_draft]
                        stats.observe_exits(exit_layers, num_accepted)
                    proposer.update(num_accepted)
                # NOTE: the first drafting round after k = 0 rounds (or of the request) also
                # prefilled the drafter on the new context: not a per-token cost sample
                draft_time = (t_verify - t_draft) if drafter_caught_up else None
                drafter_caught_up = num_draft > 0
                policy.update(num_draft, num_accepted, draft_time, t_accept - t_verify, exit_layers)
                stats.other_time_s += time.perf_counter() - t_accept
        finally:
            if proposer is not None:
                proposer.close()
            stats.policy = policy.summary()
            learned = policy.kpolicy if isinstance(policy, ParamsPolicy) else policy
            if learn_key is not None and isinstance(learned, _Learnable):
                self._learned[learn_key] = learned

        yield GenerationResult(
            finish_reason=finish,
            prompt_tokens=num_prompt,
            completion_tokens=len(tokens) - num_prompt,
            token_ids=tokens[num_prompt:],
            text="".join(text_parts),
            stats=stats,
        )

    @staticmethod
    def _sample(
        logits: torch.Tensor,  # [1, vocab_size]
        sampling,
        generator: torch.Generator | None,
    ) -> list[int]:
        if sampling.greedy:
            return logits.argmax(-1).tolist()
        return sample_from_probs(logits_to_probs(logits, sampling), generator).tolist()
