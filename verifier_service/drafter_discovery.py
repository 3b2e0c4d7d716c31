"""Drafter pools found in the store's registry (`shared.registry`): a verifier started with
Redis and no `--drafter` drafts through a live pool that serves its tokenizer, and moves to
another live one when its pool stops being reachable (its heartbeat expired, or its channel
is not ready), so pools on other machines start, die and get replaced without restarting a
verifier. Until a pool is found (or while none is reachable), the model-based methods are
not reported and decode with k = 0, as when a `--drafter` pool is down."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

from shared.registry import discover, poll
from shared.store import StoreAuthError

if TYPE_CHECKING:
    import grpc

    from verifier_service.servicer import VerifierServicer

logger = logging.getLogger(__name__)

DEFAULT_POLL_S = 2.0
FIRST_SYNC_S = 2.0  # start-up waits this long at most for the first look (a dead store)


def reachable(channel: grpc.Channel | None, timeout_s: float = 1.0) -> bool:
    """Whether the channel connects within `timeout_s` (blocking: run it in an executor)."""
    import grpc

    if channel is None:
        return False
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        return True
    except grpc.FutureTimeoutError:
        return False


class DrafterFollower:
    """Keeps `servicer` connected to a live drafter pool from an asyncio task."""

    def __init__(self, servicer: VerifierServicer, poll_s: float = DEFAULT_POLL_S) -> None:
        self.servicer = servicer
        self.poll_s = poll_s
        self._task: asyncio.Task | None = None
        self._left: set[str] = set()  # pools we moved away from whose keys are still live

    async def start(self) -> None:
        """Look once (so a verifier that reports SERVING drafts at once when a pool is up),
        then keep looking in the background."""
        try:
            await asyncio.wait_for(self.sync(), FIRST_SYNC_S)
        except StoreAuthError:
            raise
        except Exception as e:  # noqa: BLE001 - store down or slow: the background loop retries
            logger.debug("registry: first look for a drafter pool failed: %s", e)
        self._task = asyncio.get_running_loop().create_task(
            poll(self.sync, self.poll_s, "drafter discovery", wait_first=True)  # it just looked
        )

    async def live_pools(self) -> set[str]:
        """Addresses of the live pools that serve this verifier's tokenizer."""
        runner = self.servicer.store  # its own loop's store: one Redis connection per process
        found = await asyncio.wrap_future(runner.submit(discover, runner.store, "drafter"))
        return found.get(self.servicer.tokenizer_hash, set())

    async def sync(self) -> str | None:
        """One look: keep a live, reachable pool; otherwise switch to another live one.
        Returns the pool drafted through from now on (None: none found yet)."""
        live = await self.live_pools()
        current = self.servicer.drafter_address
        if current in live and await asyncio.get_running_loop().run_in_executor(
            None, reachable, self.servicer.drafter_channel
        ):
            return current
        # NOTE: the current pool is never picked again here, and pools left before come
        # last: a killed pool's key lives on until its TTL runs out. A random pick spreads
        # verifiers over the pools
        self._left &= live  # a key that went away: the address may come back as a new pool
        others = live - {current}
        if not others:
            return current  # nothing better: its streams fail over to k = 0 meanwhile
        address = random.choice(sorted(others - self._left or others))
        logger.info("registry: drafting through pool %s (was %s)", address, current or "none")
        if current is not None:
            self._left.add(current)
        self.servicer.connect_drafter(address)
        return address

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
