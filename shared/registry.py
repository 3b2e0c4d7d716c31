"""Replica registry in the store: services announce themselves, routers and verifiers find them.

    specdec:replica:<service>:<target>:<address>  ->  b"1", expiring `ttl_s` after the last beat

<service> is "verifier" (<target>: the target's name) or "drafter" (<target>: the hash of
a tokenizer the pool's drafters use, one key per hash: a pool serves every target that
shares a drafter's tokenizer, so that is what a verifier looking for one matches on).

One key per replica, renewed by `SET ... PX` every `ttl_s / 3` (per-field hash expiry would
need Redis >= 7.4). A replica that stops beating (killed, partitioned) disappears when its
key expires; one that stops cleanly deletes its key. `discover` lists the live replicas of a
service by target with SCAN, so a router started with a store picks up verifiers on other
machines without a restart (`router.discovery.RegistryWatcher`), and a verifier started
without `--drafter` picks a drafter pool (`verifier_service.drafter_discovery`).

The registry is only useful on a store every process shares (Redis); with the in-memory
store each process sees its own registrations only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable

from shared.store import PREFIX, Store, StoreAuthError, StoreUnavailable

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 10.0
ADVERTISE_HOST_ENV = "SPECDEC_ADVERTISE_HOST"


def advertised_address(host: str, port: int) -> str:
    """The address other machines reach this replica at: SPECDEC_ADVERTISE_HOST (e.g. a pod
    IP), else the bind host, else (bound to every interface) the host name."""
    advertised = os.environ.get(ADVERTISE_HOST_ENV) or host
    if advertised in ("", "0.0.0.0", "::", "[::]"):
        advertised = socket.gethostname()
    return f"{advertised}:{port}"


def replica_key(service: str, target: str, address: str) -> str:
    return f"{PREFIX}replica:{service}:{target}:{address}"


async def discover(store: Store, service: str) -> dict[str, set[str]]:
    """Live replicas of `service`: target -> addresses."""
    prefix = f"{PREFIX}replica:{service}:"
    found: dict[str, set[str]] = {}
    for key in await store.keys_with_prefix(prefix):
        target, sep, address = key[len(prefix) :].partition(":")
        if sep and address:
            found.setdefault(target, set()).add(address)
    return found


async def poll(sync: Callable[[], Awaitable[object]], interval_s: float, what: str, *,
               wait_first: bool = False) -> None:  # fmt: skip
    """Call `sync` (one look at the registry) every `interval_s` until cancelled. A store
    that is down keeps what `sync` found last; wrong credentials end the polling."""
    while True:
        if wait_first:
            await asyncio.sleep(interval_s)
        try:
            await sync()
        except StoreAuthError:
            logger.error("registry: the store refused our credentials; %s stopped", what)
            return
        except Exception as e:  # noqa: BLE001 - store down: keep what we have
            logger.debug("registry poll failed: %s", e)
        if not wait_first:
            await asyncio.sleep(interval_s)


class Heartbeat:
    """Keeps one replica's key alive from an asyncio task (on the store's loop)."""

    def __init__(self, store: Store, service: str, target: str, address: str, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.store = store
        self.key = replica_key(service, target, address)
        self.ttl_s = ttl_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            try:
                await self.store.set_ex(self.key, b"1", self.ttl_s)
            except StoreUnavailable as e:  # keep beating: the key returns with the store
                logger.debug("registry heartbeat failed: %s", e)
            except Exception:  # a heartbeat must never die
                logger.exception("registry heartbeat failed")
            await asyncio.sleep(self.ttl_s / 3)

    async def stop(self) -> None:
        """Stop beating and delete the key (a clean shutdown leaves at once)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        try:
            await self.store.delete(self.key)
        except Exception as e:  # noqa: BLE001 - the key expires anyway
            logger.debug("registry delete failed: %s", e)
