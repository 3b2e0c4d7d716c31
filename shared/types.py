"""Per-request and per-step data (plain dataclasses, never pydantic in the loop; no torch:
the router imports these)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum

from shared.errors import InvalidArgumentError


# NOTE: below this, logits / temperature overflows float32 (NaN probabilities): such a
# temperature means "as sharp as it gets", i.e. greedy, for the target and the drafter alike
MIN_TEMPERATURE = 1e-5


@dataclass(slots=True, frozen=True)
class SamplingParams:
    temperature: float = 0.0  # < MIN_TEMPERATURE (0 included) = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 = off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def validate(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise InvalidArgumentError(
                f"temperature must be a finite number >= 0, got {self.temperature}", field="temperature"
            )
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {self.top_p}", field="top_p")
        if self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be >= 0, got {self.top_k}", field="top_k")


class FinishReason(str, Enum):
    STOP = "stop"  # EOS token or a stop string
    LENGTH = "length"  # max_new_tokens or the target's context
    ABORT = "abort"  # cancelled by the client or shut down


@dataclass(slots=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    method: str = "none"
    num_speculative_tokens: int | None = None  # None: the policy's default; fixed when given
    request_id: str = ""
    # Drafter parameters pinned for the whole request (sorted: `fixed_exit`,
    # `threshold.<exit>`; see `shared.proposer.Proposer.set_params`), over the method's
    # configured ones. Empty: the configured ones.
    drafter_params: dict[str, float] = field(default_factory=dict)
    tenant: str = ""  # whose shared draft state it reads and teaches ("": everyone's)


@dataclass(slots=True)
class SpecStats:
    """Per-request speculation stats. τ = 1 + accepted / speculative rounds."""

    num_rounds: int = 0  # all target forwards after prefill, k = 0 rounds included
    num_spec_rounds: int = 0  # rounds with k > 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_per_pos: list[int] = field(default_factory=list)
    target_time_s: float = 0.0  # prefill + verify forwards
    draft_time_s: float = 0.0  # proposer calls
    other_time_s: float = 0.0  # everything else in the loop (accept, detok, stop checks)
    policy: dict[str, float] = field(default_factory=dict)  # what the policy chose (k, exits)
    drafter: dict[str, float] = field(default_factory=dict)  # the proposer's counters (`CountingProposer`)
    # nested drafters: draft tokens per exit depth, and how many of them were accepted
    num_draft_tokens_per_exit: dict[int, int] = field(default_factory=dict)
    num_accepted_tokens_per_exit: dict[int, int] = field(default_factory=dict)

    def observe_round(self, num_draft: int, num_accepted: int, exit_layers: list[int] | None) -> None:
        """One speculative round: `num_draft` tokens verified, the first `num_accepted`
        accepted; `exit_layers` (nested drafters): the exit depth of each draft token."""
        self.num_spec_rounds += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        per_pos = self.num_accepted_per_pos
        if len(per_pos) < num_draft:
            per_pos.extend([0] * (num_draft - len(per_pos)))
        for pos in range(num_accepted):
            per_pos[pos] += 1
        if exit_layers:
            self.observe_exits(exit_layers[:num_draft], num_accepted)

    def observe_exits(self, exit_layers: list[int], num_accepted: int) -> None:
        """One round's draft tokens by exit depth; the first `num_accepted` were accepted."""
        drafted, accepted = self.num_draft_tokens_per_exit, self.num_accepted_tokens_per_exit
        for i, e in enumerate(exit_layers):
            drafted[e] = drafted.get(e, 0) + 1
            if i < num_accepted:
                accepted[e] = accepted.get(e, 0) + 1

    @property
    def mean_acceptance_length(self) -> float:
        if self.num_spec_rounds == 0:
            return 1.0
        return 1.0 + self.num_accepted_tokens / self.num_spec_rounds

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean_acceptance_length"] = self.mean_acceptance_length
        return d


@dataclass(slots=True)
class GenerationChunk:
    """Tokens accepted in one round, and the text they complete (may be empty)."""

    token_ids: list[int]
    text: str


@dataclass(slots=True)
class GenerationResult:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    text: str
    stats: SpecStats
