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
  - an empty stop string, too many or too long ones → InvalidArgumentError ("stop")
  - a message, or a text prompt, over the limits    → InvalidArgumentError ("request", "prompt")

The rules on decoding options are `shared.validation`'s, which the verifier applies again.

NOTE(router): a request whose prompt + max_new_tokens overflows the context is rejected,
not silently clamped (as OpenAI and vLLM do): the client asked for a length the target cannot
produce, and a clamp would return `finish_reason=length` early with no explanation.

Text prompts are tokenized by the caller-supplied `tokenize(model, text)` (the router's
tokenizer, without special tokens), which keeps this module free of transformers.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from shared.config import RequestLimits
from shared.errors import InvalidArgumentError, NotFoundError
from shared.pb.specdec.v1 import router_pb2, verifier_pb2
from shared.types import SamplingParams
from shared.validation import (
    check_lengths,
    check_message_size,
    check_options,
    check_prompt_ids,
    check_prompt_text,
)
from shared.wire import sampling_to_proto

DEFAULT_LIMITS = RequestLimits()
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
    tenant: str = ""  # the caller's key id (`router.auth`); "" when keys are off

    def to_verifier(self) -> verifier_pb2.VerifierGenerateRequest:
        msg = verifier_pb2.VerifierGenerateRequest(
            request_id=self.request_id,
            tenant=self.tenant,
            model=self.model,
            prompt_token_ids=self.prompt_ids,
            sampling=sampling_to_proto(self.sampling),
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
    limits: RequestLimits = DEFAULT_LIMITS,
) -> ValidatedRequest:
    """Check `request` against `models`; raise the domain error naming the field at fault.
    Everything cheap is checked before the prompt is tokenized."""
    check_message_size(request.ByteSize(), limits)
    if not request.model:
        raise InvalidArgumentError("model is required", field="model")
    spec = models.get(request.model)
    if spec is None:
        known = ", ".join(sorted(models)) or "none"
        raise NotFoundError(
            f"model {request.model!r} is not served here (served: {known})", field="model"
        )

    options = check_options(request, request.method or spec.default_method,
                            max_k=spec.max_speculative_tokens, limits=limits)  # fmt: skip
    _check_offered(options.method, spec)
    prompt_ids = _prompt_ids(request, spec, tokenize, limits)
    max_new_tokens = request.max_new_tokens
    check_lengths(len(prompt_ids), max_new_tokens, limit=spec.max_new_tokens,
                  max_context=spec.max_context, model=spec.name)  # fmt: skip

    return ValidatedRequest(
        model=spec.name,
        prompt_ids=prompt_ids,
        sampling=options.sampling,
        max_new_tokens=max_new_tokens,
        method=options.method,
        stop=options.stop,
        num_speculative_tokens=options.num_speculative_tokens,
        request_id=request.request_id or uuid.uuid4().hex,
    )


def _check_offered(method: str, spec: ModelSpec) -> None:
    if method not in spec.methods:
        raise InvalidArgumentError(
            f"method {method!r} is not offered for model {spec.name!r} "
            f"(offered: {', '.join(spec.methods)})",
            field="method",
        )


def _prompt_ids(
    request: router_pb2.GenerateRequest, spec: ModelSpec, tokenize: Tokenize, limits: RequestLimits
) -> list[int]:
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidArgumentError("prompt is required (text or token_ids)", field="prompt")
    if kind == "text":
        check_prompt_text(request.text, limits)
        ids = list(tokenize(spec.name, request.text))
        if not ids:
            raise InvalidArgumentError("prompt text tokenizes to no tokens", field="prompt")
        return ids
    ids = list(request.token_ids.token_ids)
    check_prompt_ids(ids, spec.vocab_size)
    return ids
