"""The store: draft state shared across requests and, on Redis, across nodes.

One small interface (`Store`) with two implementations:

- `MemoryStore` (the embedded default): one process's dicts, bounded in keys, with TTLs;
- `RedisStore`: `redis.asyncio` over a connection pool, every command with a socket
  timeout, reconnects with exponential backoff (redis-py's own `Retry`), and a circuit
  breaker: after `breaker_failures` failures in a row every call fails fast for
  `breaker_cooldown_s`, then one call probes. A down Redis thus costs a failed future, not
  a timeout per round. Single Redis (or Sentinel via a `redis+sentinel` setup outside
  this module), not Redis Cluster: a fetch reads several keys in one pipeline, which would
  cross hash slots.

Keys follow DESIGN.md ("Store keys", prefix `specdec:`); values are plain bytes or numbers
(never pickle), each key has a TTL and a bounded size. A caller treats any value it cannot
parse as missing and counts it (`STORE_BAD_VALUES`).

Sorted sets carry counted items (the n-gram table: member = a packed continuation, score =
its count): `incr_counts` adds to scores, keeps each key's `keep_top` highest members and
renews the key's TTL; `top` reads the best members of several keys at once.
Plain values (`set_ex`, `get`) carry the registry's heartbeats and the draft cache's packed
drafts; in memory they are bounded by `max_keys` too.

Calls are coroutines. `StoreRunner` runs a store on its own event loop in a daemon thread,
so the verifier's step thread submits work and never waits for it (DESIGN.md: the store
is never awaited inside a round).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from shared import metrics

if TYPE_CHECKING:
    from shared.config import StoreConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

PREFIX = "specdec:"
REDIS_URL_ENV = "SPECDEC_REDIS_URL"


class StoreUnavailable(Exception):
    """The store did not answer (down, timed out, or the breaker is open)."""


class StoreAuthError(Exception):
    """The store refused our credentials: a configuration error, not an outage."""


class Store(Protocol):
    name: str  # "memory" or "redis" (metrics label)

    async def ping(self) -> None: ...

    async def incr_counts(
        self, updates: Sequence[tuple[str, bytes, float]], keep_top: int, ttl_s: int
    ) -> None: ...

    async def top(self, keys: Sequence[str], n: int) -> list[list[tuple[bytes, float]]]: ...

    async def set_ex(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def delete(self, key: str) -> None: ...

    async def keys_with_prefix(self, prefix: str) -> list[str]: ...

    async def close(self) -> None: ...


class MemoryStore:
    """One process's store: sorted sets as dicts, at most `max_keys` keys (least recently
    written first out), each expiring `ttl_s` after its last write."""

    name = "memory"

    def __init__(self, max_keys: int = 200_000) -> None:
        self.max_keys = max_keys
        self._sets: OrderedDict[str, tuple[float, dict[bytes, float]]] = OrderedDict()
        # plain keys (the registry, the draft cache): expiry, value; least recently written first out
        self._values: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def ping(self) -> None:
        return None

    async def incr_counts(
        self, updates: Sequence[tuple[str, bytes, float]], keep_top: int, ttl_s: int
    ) -> None:
        now = time.monotonic()
        touched: set[str] = set()
        for key, member, amount in updates:
            expiry, counts = self._sets.pop(key, (0.0, {}))
            if expiry and expiry < now:
                counts = {}
            counts[member] = counts.get(member, 0.0) + amount
            self._sets[key] = (now + ttl_s, counts)
            touched.add(key)
        for key in touched:
            _, counts = self._sets[key]
            if len(counts) > keep_top:
                best = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[:keep_top]
                self._sets[key] = (now + ttl_s, dict(best))
        while len(self._sets) > self.max_keys:
            self._sets.popitem(last=False)

    async def top(self, keys: Sequence[str], n: int) -> list[list[tuple[bytes, float]]]:
        now = time.monotonic()
        out = []
        for key in keys:
            expiry, counts = self._sets.get(key, (0.0, {}))
            if expiry < now:
                out.append([])
                continue
            out.append(sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[:n])
        return out

    async def set_ex(self, key: str, value: bytes, ttl_s: float) -> None:
        self._values.pop(key, None)
        self._values[key] = (time.monotonic() + ttl_s, value)
        while len(self._values) > self.max_keys:
            self._values.popitem(last=False)

    async def get(self, key: str) -> bytes | None:
        expiry, value = self._values.get(key, (0.0, None))
        return value if expiry >= time.monotonic() else None

    async def delete(self, key: str) -> None:
        self._values.pop(key, None)

    async def keys_with_prefix(self, prefix: str) -> list[str]:
        now = time.monotonic()
        for key in [k for k, (expiry, _) in self._values.items() if expiry < now]:
            del self._values[key]
        return [k for k in self._values if k.startswith(prefix)]

    async def close(self) -> None:
        self._sets.clear()
        self._values.clear()


class CircuitBreaker:
    """Fail fast while a dependency is down: open after `failures` failures in a row, stay
    open `cooldown_s`, then let one call through (half-open) and close on its success.

    NOTE: a dozen lines, not a library: the async breakers on PyPI (aiobreaker, purgatory)
    bring their own storage and listener machinery for what is one counter and a clock."""

    def __init__(self, failures: int, cooldown_s: float) -> None:
        self.failures, self.cooldown_s = failures, cooldown_s
        self._in_row = 0
        self._open_until = 0.0

    @property
    def is_open(self) -> bool:
        return self._in_row >= self.failures and time.monotonic() < self._open_until

    def success(self) -> None:
        self._in_row = 0

    def failure(self) -> None:
        self._in_row += 1
        if self._in_row >= self.failures:
            self._open_until = time.monotonic() + self.cooldown_s


class RedisStore:
    """`Store` on a Redis server (`redis.asyncio`)."""

    name = "redis"

    def __init__(self, url: str, *, username: str | None = None, password: str | None = None,
                 ssl_ca_file: str | None = None, socket_timeout_s: float = 0.25,
                 max_connections: int = 16, breaker_failures: int = 3,
                 breaker_cooldown_s: float = 2.0) -> None:  # fmt: skip
        import redis.asyncio as redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        kwargs: dict = {}
        if username:
            kwargs["username"] = username
        if password:
            kwargs["password"] = password
        if ssl_ca_file:
            kwargs["ssl_ca_certs"] = ssl_ca_file
        self.url = url
        self.client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.01), retries=1), max_connections=max_connections,
            health_check_interval=30, **kwargs,
        )  # fmt: skip
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown_s)

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        from redis.exceptions import AuthenticationError, RedisError, ResponseError

        if self.breaker.is_open:
            metrics.STORE_CALLS.labels(self.name, op, "breaker_open").inc()
            raise StoreUnavailable("store circuit breaker is open")
        try:
            result = await fn()
        except AuthenticationError as e:
            metrics.STORE_CALLS.labels(self.name, op, "auth_error").inc()
            raise StoreAuthError(f"Redis at {self.url} refused the credentials: {e}") from e
        except ResponseError as e:
            if "NOAUTH" in str(e) or "WRONGPASS" in str(e) or "NOPERM" in str(e):
                metrics.STORE_CALLS.labels(self.name, op, "auth_error").inc()
                raise StoreAuthError(f"Redis at {self.url} refused the credentials: {e}") from e
            raise
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self.breaker.failure()
            metrics.STORE_CALLS.labels(self.name, op, "error").inc()
            metrics.STORE_UP.labels(self.name).set(0)
            raise StoreUnavailable(f"Redis at {self.url}: {e}") from e
        self.breaker.success()
        metrics.STORE_CALLS.labels(self.name, op, "ok").inc()
        metrics.STORE_UP.labels(self.name).set(1)
        return result

    async def ping(self) -> None:
        await self._call("ping", self.client.ping)

    async def incr_counts(
        self, updates: Sequence[tuple[str, bytes, float]], keep_top: int, ttl_s: int
    ) -> None:
        async def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            keys = []
            for key, member, amount in updates:
                pipe.zincrby(key, amount, member)
                keys.append(key)
            for key in dict.fromkeys(keys):
                pipe.zremrangebyrank(key, 0, -(keep_top + 1))  # keep the top `keep_top`
                pipe.expire(key, ttl_s)
            await pipe.execute()

        await self._call("incr_counts", run)

    async def top(self, keys: Sequence[str], n: int) -> list[list[tuple[bytes, float]]]:
        async def run() -> list:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.zrevrange(key, 0, n - 1, withscores=True)
            return await pipe.execute(raise_on_error=False)

        replies = await self._call("top", run)
        out = []
        for reply in replies:
            if isinstance(reply, Exception):  # e.g. WRONGTYPE: a foreign value under our key
                metrics.STORE_BAD_VALUES.labels(self.name).inc()
                out.append([])
            else:
                out.append([(bytes(m), float(s)) for m, s in reply])
        return out

    async def set_ex(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._call("set_ex", lambda: self.client.set(key, value, px=max(1, int(ttl_s * 1000))))

    async def get(self, key: str) -> bytes | None:
        from redis.exceptions import ResponseError

        async def run() -> bytes | None:
            try:
                return await self.client.get(key)
            except ResponseError as e:
                if "WRONGTYPE" not in str(e):
                    raise
                return b""  # not a plain value, so not ours: b"" parses as nothing, the caller counts it

        return await self._call("get", run)

    async def delete(self, key: str) -> None:
        await self._call("delete", lambda: self.client.delete(key))

    async def keys_with_prefix(self, prefix: str) -> list[str]:
        async def run() -> list[str]:
            # SCAN, never KEYS: it does not block the server on a large keyspace
            return [k.decode() async for k in self.client.scan_iter(match=prefix + "*", count=500)]

        return await self._call("scan", run)

    async def close(self) -> None:
        await self.client.aclose()


def redis_url(config: StoreConfig) -> str | None:
    """The Redis URL in effect: SPECDEC_REDIS_URL wins over the config file."""
    return os.environ.get(REDIS_URL_ENV) or config.redis_url


def make_store(config: StoreConfig) -> Store:
    url = redis_url(config)
    if not url:
        return MemoryStore(config.memory_max_keys)
    password = os.environ.get("SPECDEC_REDIS_PASSWORD") or config.redis_password
    return RedisStore(url, username=config.redis_username, password=password,
                      ssl_ca_file=str(config.redis_ca_file) if config.redis_ca_file else None,
                      socket_timeout_s=config.socket_timeout_s, breaker_failures=config.breaker_failures,
                      breaker_cooldown_s=config.breaker_cooldown_s)  # fmt: skip


class StoreRunner:
    """A store on its own event loop in a daemon thread. `submit` returns a
    `concurrent.futures.Future` at once: callers poll `done()` and never block on it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"store-{store.name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Awaitable[T]], *args) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(fn(*args), self.loop)

    def check(self, timeout_s: float = 2.0) -> bool:
        """Start-up check: True when the store answers; False (a warning: degraded, it
        keeps retrying in the background) when it does not; raises StoreAuthError on wrong
        credentials (the caller exits with a clear message)."""
        try:
            self.submit(self.store.ping).result(timeout_s)
            return True
        except StoreAuthError:
            raise
        except Exception as e:  # noqa: BLE001 - down at start-up = degraded, not fatal
            logger.warning("store %s unreachable at start-up (%s): running without it until it answers",
                           self.store.name, e)  # fmt: skip
            metrics.STORE_UP.labels(self.store.name).set(0)
            return False

    def close(self) -> None:
        try:
            self.submit(self.store.close).result(2.0)
        except Exception as e:  # noqa: BLE001 - closing a dead connection
            logger.debug("closing the store: %s", e)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(2.0)
