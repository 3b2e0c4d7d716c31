"""Request rules that every service enforces (the router on public requests, the verifier
again because it may be called directly): pure, torch-free; each failure is an
`InvalidArgumentError` naming the field at fault."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.errors import InvalidArgumentError
from shared.methods import SPEC_METHODS
from shared.types import SamplingParams
from shared.wire import sampling_from_proto

if TYPE_CHECKING:
    from shared.config import RequestLimits
    from shared.pb.specdec.v1 import router_pb2, verifier_pb2


@dataclass(slots=True, frozen=True)
class DecodingOptions:
    """How a request asks to be decoded, checked: what router and verifier both forward."""

    method: str
    sampling: SamplingParams
    num_speculative_tokens: int | None  # None: the method's configured k
    stop: list[str]


def check_options(
    msg: router_pb2.GenerateRequest | verifier_pb2.VerifierGenerateRequest,
    method: str,
    *,
    max_k: int,
    limits: RequestLimits,
) -> DecodingOptions:
    """The rules on a request's decoding options that every service enforces: `method`
    (the request's, or the caller's default for an empty one) is known, sampling is valid,
    k is in [0, max_k], the stop strings are bounded. Both request messages carry these
    fields under the same names."""
    _check_method(method)
    sampling = sampling_from_proto(msg.sampling)
    sampling.validate()
    k = msg.num_speculative_tokens if msg.HasField("num_speculative_tokens") else None
    _check_num_speculative_tokens(k, max_k)
    stop = list(msg.stop)
    _check_stop(stop, limits)
    return DecodingOptions(method=method, sampling=sampling, num_speculative_tokens=k, stop=stop)


def check_prompt_ids(ids: Sequence[int], vocab_size: int) -> None:
    if not ids:
        raise InvalidArgumentError("prompt token_ids is empty", field="prompt")
    for pos, tok in enumerate(ids):
        if not 0 <= tok < vocab_size:
            raise InvalidArgumentError(
                f"prompt token id {tok} at position {pos} is outside [0, {vocab_size})", field="prompt"
            )


def check_lengths(num_prompt: int, max_new_tokens: int, *, limit: int, max_context: int, model: str) -> None:
    """Prompt + max_new_tokens must fit the context (rejected, never clamped: a clamp would
    end the output early with finish_reason=length and no explanation)."""
    if num_prompt >= max_context:
        raise InvalidArgumentError(
            f"prompt has {num_prompt} tokens; model {model!r} accepts at most "
            f"{max_context - 1} so that one token can be generated",
            field="prompt",
        )
    if not 0 < max_new_tokens <= limit:
        raise InvalidArgumentError(
            f"max_new_tokens must be in [1, {limit}] for model {model!r}, got {max_new_tokens}",
            field="max_new_tokens",
        )
    if num_prompt + max_new_tokens > max_context:
        raise InvalidArgumentError(
            f"prompt ({num_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"context of model {model!r} ({max_context} tokens)",
            field="max_new_tokens",
        )


def _check_method(method: str) -> None:
    if method not in SPEC_METHODS:
        raise InvalidArgumentError(
            f"unknown method {method!r}; expected one of {', '.join(SPEC_METHODS)}", field="method"
        )


def _check_num_speculative_tokens(k: int | None, max_k: int) -> None:
    if k is not None and not 0 <= k <= max_k:
        raise InvalidArgumentError(
            f"num_speculative_tokens must be in [0, {max_k}], got {k}", field="num_speculative_tokens"
        )


def _check_stop(stop: Sequence[str], limits: RequestLimits) -> None:
    if len(stop) > limits.max_stop_strings:
        raise InvalidArgumentError(
            f"at most {limits.max_stop_strings} stop strings, got {len(stop)}", field="stop"
        )
    for s in stop:
        if not s:
            raise InvalidArgumentError("stop strings must be non-empty", field="stop")
        if len(s) > limits.max_stop_chars:
            raise InvalidArgumentError(
                f"a stop string has {len(s)} characters; at most {limits.max_stop_chars}", field="stop"
            )


def check_prompt_text(text: str, limits: RequestLimits) -> None:
    """Before tokenization: non-empty, bounded (tokenizing is the router's own cost)."""
    if not text:
        raise InvalidArgumentError("prompt text is empty", field="prompt")
    if len(text) > limits.max_prompt_chars:
        raise InvalidArgumentError(
            f"prompt has {len(text)} characters; at most {limits.max_prompt_chars}", field="prompt"
        )


def check_message_size(num_bytes: int, limits: RequestLimits) -> None:
    if num_bytes > limits.max_message_bytes:
        raise InvalidArgumentError(
            f"request message has {num_bytes} bytes; at most {limits.max_message_bytes}", field="request"
        )
