"""Domain errors, mapped to gRPC status codes and HTTP codes in one place.

Raise these anywhere; only servicers and HTTP handlers turn them into statuses
(`grpc_status()` / `http_status()`).
"""

from __future__ import annotations

import grpc


class SpecdecError(Exception):
    """Base class; `code` is the gRPC status the boundary sets."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500
    openai_type: str = "server_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgumentError(SpecdecError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    openai_type = "invalid_request_error"


class NotFoundError(SpecdecError):
    code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    openai_type = "invalid_request_error"


class UnauthenticatedError(SpecdecError):
    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    openai_type = "authentication_error"


class ResourceExhaustedError(SpecdecError):
    """Full (a replica's rows and queue) or over a rate; `retry_after_s` goes into HTTP
    Retry-After."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    openai_type = "rate_limit_error"

    def __init__(self, message: str, *, field: str | None = None, retry_after_s: float = 1.0) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class RateLimitedError(ResourceExhaustedError):
    """A key over its request rate."""


class DeadlineExceededError(SpecdecError):
    """A request that waited too long (a verifier's queue timeout)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    openai_type = "timeout"


class UnavailableError(SpecdecError):
    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    openai_type = "server_error"


class FailedPreconditionError(SpecdecError):
    """A peer that cannot serve this session (tokenizer hash or protocol version mismatch)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 400
    openai_type = "invalid_request_error"


# gRPC trailing metadata naming the request field at fault (a domain error's `field`)
FIELD_METADATA = "specdec-field"
# gRPC trailing metadata on a RESOURCE_EXHAUSTED that means "this replica is full, try
# again" (a transport RESOURCE_EXHAUSTED, e.g. a message too large, has no such mark)
CAPACITY_METADATA = "specdec-capacity"

_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_from_int(number: int) -> grpc.StatusCode:
    """The gRPC status of a numeric code (in-band `Error.code`); UNKNOWN if none."""
    return _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def status_to_int(code: grpc.StatusCode) -> int:
    return code.value[0]
