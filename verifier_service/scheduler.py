"""The step loop of one verifier replica: one thread owns the engine, requests join and leave
between steps (continuous batching), and wait in a bounded queue for a free row.

    ticket = scheduler.submit(request, proposer_factory, sink)   # any thread; QueueFull if full
    ... sink(item) is called from the step thread: chunks, then a result or an exception ...
    scheduler.cancel(ticket)                                     # any thread; idempotent

A queued request leaves the queue at once when cancelled, and with `QueueTimeout` after
`queue_timeout_s`; its proposer session is only opened when it gets a row. With no rows and
an empty queue the thread blocks on a condition (no spinning). Sinks must not block: the
servicer's hands items to its event loop (`call_soon_threadsafe`), so a slow reader buffers
its tokens (at most its `max_new_tokens`) and never stalls a step.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from shared import metrics
from shared.errors import DeadlineExceededError, ResourceExhaustedError
from shared.sampling import with_seed

if TYPE_CHECKING:
    from shared.proposer import ProposerFactory
    from shared.types import GenerationRequest
    from verifier_service.loop import Row, Sink, SpecDecodeLoop

logger = logging.getLogger(__name__)


class QueueFull(ResourceExhaustedError):
    """Every row is busy and the queue holds `max_queued_requests`."""


class QueueTimeout(DeadlineExceededError):
    """The request waited `queue_timeout_s` for a row."""


@dataclass(slots=True, eq=False)
class Ticket:
    request: GenerationRequest
    factory: ProposerFactory | None
    sink: Sink
    enqueued_at: float = field(default_factory=time.monotonic)
    row: Row | None = None  # set when the request got a row
    cancelled: bool = False


class Scheduler:
    def __init__(self, loop: SpecDecodeLoop, *, max_queued_requests: int, queue_timeout_s: float) -> None:
        self.loop = loop
        self.max_batch_rows = loop.engine.max_batch_rows
        self.max_queued_requests = max_queued_requests
        self.queue_timeout_s = queue_timeout_s
        self.target = loop.target
        self._waiting: deque[Ticket] = deque()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"step-loop-{self.target}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- any thread

    @property
    def capacity(self) -> int:
        """Requests one replica takes at once: rows + queue."""
        return self.max_batch_rows + self.max_queued_requests

    @property
    def num_queued(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self.loop.rows)

    def submit(self, request: GenerationRequest, factory: ProposerFactory | None, sink: Sink) -> Ticket:
        ticket = Ticket(request, factory, sink)
        with self._cv:
            if self._stopped:
                raise QueueFull(f"verifier of {self.target!r} is shutting down")
            # waiting tickets take the free rows first (at the next step boundary), then the queue
            if len(self._waiting) >= self.loop.num_free_slots + self.max_queued_requests:
                metrics.NUM_REJECTED_REQUESTS.labels(self.target, "queue_full").inc()
                raise QueueFull(
                    f"verifier of {self.target!r} is at capacity ({self.max_batch_rows} rows and "
                    f"{self.max_queued_requests} queued requests); retry later"
                )
            self._waiting.append(ticket)
            metrics.NUM_QUEUED_REQUESTS.labels(self.target).set(len(self._waiting))
            self._cv.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        with self._cv:
            ticket.cancelled = True
            if ticket.row is not None:
                ticket.row.cancelled = True  # leaves at the next step boundary
            elif ticket in self._waiting:
                self._waiting.remove(ticket)
                metrics.NUM_QUEUED_REQUESTS.labels(self.target).set(len(self._waiting))
            self._cv.notify()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout)

    # ---------------------------------------------------------------- the step thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                admitted = self._admit()
                if admitted is None:
                    return
                for ticket in admitted:
                    self._start(ticket)
                try:
                    self.loop.step()
                except Exception:  # noqa: BLE001 - the loop fails rows itself; never die
                    logger.exception("step loop error")

    def _admit(self) -> list[Ticket] | None:
        """Wait for work; take queued requests into free rows; expire timed-out ones."""
        with self._cv:
            while not self._stopped and not self._waiting and not self.loop.rows:
                self._cv.wait()
            if self._stopped:
                for ticket in self._waiting:
                    ticket.sink(QueueFull(f"verifier of {self.target!r} is shutting down"))
                self._waiting.clear()
                return None
            now = time.monotonic()
            expired = [t for t in self._waiting if now - t.enqueued_at > self.queue_timeout_s]
            for ticket in expired:
                self._waiting.remove(ticket)
                metrics.NUM_REJECTED_REQUESTS.labels(self.target, "queue_timeout").inc()
                ticket.sink(QueueTimeout(
                    f"request waited {self.queue_timeout_s:g} s in the queue of {self.target!r} without a free row"
                ))  # fmt: skip
            admitted = []
            while self._waiting and self.loop.num_free_slots - len(admitted) > 0:
                ticket = self._waiting.popleft()
                metrics.QUEUE_TIME.labels(self.target).observe(now - ticket.enqueued_at)
                admitted.append(ticket)
            metrics.NUM_QUEUED_REQUESTS.labels(self.target).set(len(self._waiting))
            return admitted

    def _start(self, ticket: Ticket) -> None:
        # a sampled request gets a seed if it has none: its drafter draws with the target's
        # own (seed, position) uniforms (shared.rejection)
        request = dataclasses.replace(ticket.request, sampling=with_seed(ticket.request.sampling))
        proposer = None
        if ticket.factory is not None:
            try:
                proposer = ticket.factory.new_session(request.prompt_ids, request.sampling)
            except Exception:  # noqa: BLE001 - no drafter costs speculation, never the request
                logger.exception("opening a proposer session failed; decoding with k = 0")
        with self._cv:
            ticket.row = self.loop.add(request, proposer, ticket.sink)
            ticket.row.cancelled = ticket.cancelled
