"""Verifier replicas found in the store's registry (`shared.registry`): a router started
with Redis adds every live verifier of a configured target and drops one whose heartbeat
stopped, so replicas on other machines join and leave without a restart. Replicas given on
the command line (or spawned by `specdec serve`) are never dropped by it."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from shared.registry import discover, poll

if TYPE_CHECKING:
    from router.server import Router
    from shared.config import StoreConfig
    from shared.store import Store

logger = logging.getLogger(__name__)

DEFAULT_POLL_S = 2.0


class RegistryWatcher:
    def __init__(self, router: Router, store: Store, poll_s: float = DEFAULT_POLL_S) -> None:
        self.router = router
        self.store = store
        self.poll_s = poll_s
        self.discovered: set[tuple[str, str]] = set()  # (target, address) this watcher added
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(poll(self.sync, self.poll_s, "discovery"))


    async def sync(self) -> None:
        """One poll: add new live replicas, drop the ones this watcher added that expired."""
        live = {(t, a) for t, addresses in (await discover(self.store, "verifier")).items() for a in addresses}
        live = {(t, a) for t, a in live if t in self.router.models}
        known = {(r.model, r.address) for r in self.router.registry.all()}
        for target, address in sorted(live - known):
            await self.router.add_replica(target, address)
            self.discovered.add((target, address))
            logger.info("registry: verifier %s of %s joined", address, target)
        for target, address in sorted(self.discovered - live):
            await self.router.registry.remove(target, address)
            self.discovered.discard((target, address))
            logger.info("registry: verifier %s of %s left (heartbeat expired)", address, target)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self.store.close()


def watch_registry(router: Router, config: StoreConfig) -> RegistryWatcher | None:
    """A started watcher when the store is Redis (a registry every process shares), else None."""
    from shared.store import make_store, redis_url

    if not redis_url(config):
        return None
    watcher = RegistryWatcher(router, make_store(config))
    watcher.start()
    return watcher
