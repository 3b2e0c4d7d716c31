"""Validation of public `GenerateRequest`s against the served targets (pure, no I/O).

`validate_request` turns a `router_pb2.GenerateRequest` into a `ValidatedRequest` the
router forwards to a verifier, or raises a domain error naming the field at fault:

  - unknown model                                   → NotFoundError (field "model")
  - empty model name                                → InvalidArgumentError ("model")
  - no prompt, empty text or empty token ids        → InvalidArgumentError ("prompt")
  - a token id < 0 or ≥ the target's vocab size     → InvalidArgumentError ("prompt")
  - prompt tokens ≥ max_context (no room to generate) → InvalidArgumentError ("prompt")
  - max_new_tokens ≤ 0 or > the target's limit      → InvalidArgumentError ("max_new_tokens")
  - prompt tokens + max_new_tokens > max_context    → InvalidArgumentError ("max_new_tokens")
  - temperature < 0, NaN or inf                     → InvalidArgumentError ("temperature")
  - top_p outside (0, 1] (unset 0 means 1.0)        → InvalidArgumentError ("top_p")
  - top_k < 0                                       → InvalidArgumentError ("top_k")
  - unknown method or one the target does not offer → InvalidArgumentError ("method")
  - num_speculative_tokens < 0 or > the target's max → InvalidArgumentError ("num_speculative_tokens")
  - an empty stop string                            → InvalidArgumentError ("stop")

NOTE(router): a request whose prompt + max_new_tokens overflows the context is rejected,
not silently clamped (as OpenAI and vLLM do): the client asked for a length the target cannot
produce, and a clamp would return `finish_reason=length` early with no explanation.

Text prompts are tokenized by the caller-supplied `tokenize(model, text)` (the router's
tokenizer, without special tokens), which keeps this module free of transformers.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from shared.config import SPEC_METHODS
from shared.errors import InvalidArgumentError, NotFoundError
from shared.sampling import SamplingParams
from shared.pb.specdec.v1 import common_pb2, router_pb2, verifier_pb2

# Methods in preference order when a request leaves `method` empty.
DEFAULT_METHOD_ORDER: tuple[str, ...] = ("draft_model", "ngram", "none")


@dataclass(slots=True, frozen=True)
class ModelSpec:
    """What the router knows about one served target."""

    name: str
    max_context: int  # prompt + generated tokens
    max_new_tokens: int  # per-request upper bound
    vocab_size: int  # valid token ids are [0, vocab_size)
    methods: tuple[str, ...]  # speculation methods the target offers ("none" always)
    tokenizer_hash: str = ""
    max_speculative_tokens: int = 10

    @property
    def default_method(self) -> str:
        for method in DEFAULT_METHOD_ORDER:
            if method in self.methods:
                return method
        return "none"


@dataclass(slots=True)
class ValidatedRequest:
    """A request that passed validation: tokenized, defaults resolved."""

    model: str
    prompt_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    method: str
    stop: list[str] = field(default_factory=list)
    num_speculative_tokens: int | None = None
    request_id: str = ""

    def to_verifier(self) -> verifier_pb2.VerifierGenerateRequest:
        sampling = common_pb2.SamplingParams(
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            top_k=self.sampling.top_k,
        )
        if self.sampling.seed is not None:
            sampling.seed = self.sampling.seed
        msg = verifier_pb2.VerifierGenerateRequest(
            request_id=self.request_id,
            model=self.model,
            prompt_token_ids=self.prompt_ids,
            sampling=sampling,
            max_new_tokens=self.max_new_tokens,
            stop=self.stop,
            method=self.method,
        )
        if self.num_speculative_tokens is not None:
            msg.num_speculative_tokens = self.num_speculative_tokens
        return msg


Tokenize = Callable[[str, str], list[int]]  # (model, text) -> token ids


def validate_request(
    request: router_pb2.GenerateRequest,
    models: Mapping[str, ModelSpec],
    tokenize: Tokenize,
) -> ValidatedRequest:
    """Check `request` against `models`; raise the domain error naming the field at fault."""
    if not request.model:
        raise InvalidArgumentError("model is required", field="model")
    spec = models.get(request.model)
    if spec is None:
        known = ", ".join(sorted(models)) or "none"
        raise NotFoundError(
            f"model {request.model!r} is not served here (served: {known})", field="model"
        )

    method = _validate_method(request.method, spec)
    prompt_ids = _prompt_ids(request, spec, tokenize)
    max_new_tokens = _validate_lengths(len(prompt_ids), request.max_new_tokens, spec)
    sampling = _sampling(request)
    sampling.validate()

    num_speculative_tokens: int | None = None
    if request.HasField("num_speculative_tokens"):
        num_speculative_tokens = request.num_speculative_tokens
        if not 0 <= num_speculative_tokens <= spec.max_speculative_tokens:
            raise InvalidArgumentError(
                f"num_speculative_tokens must be in [0, {spec.max_speculative_tokens}], "
                f"got {num_speculative_tokens}",
                field="num_speculative_tokens",
            )
    stop = list(request.stop)
    if any(s == "" for s in stop):
        raise InvalidArgumentError("stop strings must be non-empty", field="stop")

    return ValidatedRequest(
        model=spec.name,
        prompt_ids=prompt_ids,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        method=method,
        stop=stop,
        num_speculative_tokens=num_speculative_tokens,
        request_id=request.request_id or uuid.uuid4().hex,
    )


def _validate_method(method: str, spec: ModelSpec) -> str:
    if not method:
        return spec.default_method
    if method not in SPEC_METHODS:
        raise InvalidArgumentError(
            f"unknown method {method!r}; expected one of {', '.join(SPEC_METHODS)}",
            field="method",
        )
    if method not in spec.methods:
        raise InvalidArgumentError(
            f"method {method!r} is not offered for model {spec.name!r} "
            f"(offered: {', '.join(spec.methods)})",
            field="method",
        )
    return method


def _prompt_ids(request: router_pb2.GenerateRequest, spec: ModelSpec, tokenize: Tokenize) -> list[int]:
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidArgumentError("prompt is required (text or token_ids)", field="prompt")
    if kind == "text":
        if not request.text:
            raise InvalidArgumentError("prompt text is empty", field="prompt")
        ids = list(tokenize(spec.name, request.text))
        if not ids:
            raise InvalidArgumentError("prompt text tokenizes to no tokens", field="prompt")
        return ids
    ids = list(request.token_ids.token_ids)
    if not ids:
        raise InvalidArgumentError("prompt token_ids is empty", field="prompt")
    for pos, tok in enumerate(ids):
        if not 0 <= tok < spec.vocab_size:
            raise InvalidArgumentError(
                f"prompt token id {tok} at position {pos} is outside [0, {spec.vocab_size})",
                field="prompt",
            )
    return ids


def _validate_lengths(num_prompt: int, max_new_tokens: int, spec: ModelSpec) -> int:
    if num_prompt >= spec.max_context:
        raise InvalidArgumentError(
            f"prompt has {num_prompt} tokens; model {spec.name!r} accepts at most "
            f"{spec.max_context - 1} so that one token can be generated",
            field="prompt",
        )
    if max_new_tokens <= 0:
        raise InvalidArgumentError(
            f"max_new_tokens must be >= 1, got {max_new_tokens}", field="max_new_tokens"
        )
    if max_new_tokens > spec.max_new_tokens:
        raise InvalidArgumentError(
            f"max_new_tokens {max_new_tokens} exceeds the limit {spec.max_new_tokens} of "
            f"model {spec.name!r}",
            field="max_new_tokens",
        )
    if num_prompt + max_new_tokens > spec.max_context:
        raise InvalidArgumentError(
            f"prompt ({num_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"context of model {spec.name!r} ({spec.max_context} tokens)",
            field="max_new_tokens",
        )
    return max_new_tokens


def _sampling(request: router_pb2.GenerateRequest) -> SamplingParams:
    s = request.sampling
    top_p = s.top_p
    # proto3 default: an unset top_p is 0, which means "off" (1.0); NaN stays NaN and fails.
    if top_p == 0.0:
        top_p = 1.0
    temperature = float(s.temperature)
    if math.isnan(temperature) or math.isinf(temperature) or temperature < 0:
        raise InvalidArgumentError(
            f"temperature must be a finite number >= 0, got {temperature}", field="temperature"
        )
    return SamplingParams(
        temperature=temperature,
        top_p=float(top_p),
        top_k=int(s.top_k),
        seed=int(s.seed) if s.HasField("seed") else None,
    )
