"""Who may call the public APIs, and how often: bearer API keys and per-key rate limits.

Keys: the environment variable SPECDEC_API_KEY (comma-separated) and/or the config's
`auth.api_key_file` (one per line, `#` comments). No key configured = open (the embedded
default on loopback). A presented key is compared with every configured key in constant
time (`hmac.compare_digest`), so timing says nothing about how much of it matched; keys are
never logged — a key is known by a short hash (`key_id`) in logs and rate-limit buckets.

Rate limits (`auth.rate_limit`, the `limits` library's notation, e.g. "60/minute"): a
moving window per key (per client address when keys are off); over it → 429 /
RESOURCE_EXHAUSTED with the seconds until the window frees a slot (HTTP `Retry-After`).

`Gatekeeper.admit(authorization, client)` is the one check both transports call.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time
from typing import TYPE_CHECKING

from shared.errors import RateLimitedError, UnauthenticatedError

if TYPE_CHECKING:
    from shared.config import AuthConfig

API_KEY_ENV = "SPECDEC_API_KEY"


def load_api_keys(config: AuthConfig, environ: dict[str, str] | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    keys = [k.strip() for k in environ.get(API_KEY_ENV, "").split(",")]
    if config.api_key_file is not None:
        for line in config.api_key_file.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            keys.append(line)
    return [k for k in keys if k]


def key_id(key: str) -> str:
    """A name for a key in logs and buckets (never the key itself)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class Gatekeeper:
    def __init__(self, keys: list[str], rate_limit: str | None = None) -> None:
        self._keys = [k.encode() for k in keys]
        self._limits = []
        if rate_limit:
            from limits import parse_many
            from limits.storage import MemoryStorage
            from limits.strategies import MovingWindowRateLimiter

            self._limits = parse_many(rate_limit)
            self._limiter = MovingWindowRateLimiter(MemoryStorage())

    @classmethod
    def from_config(cls, config: AuthConfig) -> Gatekeeper:
        return cls(load_api_keys(config), config.rate_limit)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, authorization: str | None) -> str | None:
        """The caller's key id (None when keys are off); UnauthenticatedError otherwise."""
        if not self._keys:
            return None
        token = bearer_token(authorization)
        if token is None:
            raise UnauthenticatedError("missing API key: send 'Authorization: Bearer <key>'")
        presented = token.encode()
        # NOTE: compare with every key (no early exit), so timing does not tell which matched
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise UnauthenticatedError("invalid API key")
        return key_id(token)

    def caller(self, authorization: str | None) -> str:
        """The key id of a call `admit` has let in ("" when keys are off): the tenant its
        shared draft state belongs to. No comparison: only admitted calls get here."""
        token = bearer_token(authorization) if self._keys else None
        return key_id(token) if token else ""

    def admit(self, authorization: str | None, client: str) -> str | None:
        """Authenticate, then count one request against the caller's rate limit."""
        caller = self.authenticate(authorization)
        bucket = caller or f"client-{client}"
        for limit in self._limits:
            if not self._limiter.hit(limit, bucket):
                reset = self._limiter.get_window_stats(limit, bucket).reset_time
                retry_after = max(1, math.ceil(reset - time.time()))
                raise RateLimitedError(f"rate limit {limit} exceeded", retry_after_s=retry_after)
        return caller
