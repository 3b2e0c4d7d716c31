"""The drafter pool: every configured drafter's `ProposerFactory`, shared by all targets.

One pool per drafter process. It checks an Open against what it serves (protocol version,
tokenizer hash, method, drafter name), makes per-session proposers, counts open sessions
(`specdec:num_active_sessions{service="drafter"}`) and owns the executor every model
forward runs in, so the servicer's event loop never blocks on torch.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from shared import metrics
from shared.config import SPEC_METHODS
from shared.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from shared.protocol import PROTOCOL_VERSION
from shared.proposer import EMPTY_DRAFT

if TYPE_CHECKING:
    from shared.config import DrafterConfig
    from shared.proposer import Draft, Proposer, ProposerFactory
    from shared.sampling import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Methods served by a drafter process (the model-free ones run inside the verifier).
MODEL_METHODS: tuple[str, ...] = ("draft_model", "sorted", "card")

# kind -> (module, factory class, required): a required kind that fails to import is a
# hard error; the others are being written elsewhere and are skipped with a log line.
_FACTORIES: dict[str, tuple[str, str, bool]] = {
    "draft_model": ("drafter_service.draft_model", "DraftModelProposerFactory", True),
    "sorted": ("drafter_service.sorted", "SortedProposerFactory", False),
    "card": ("drafter_service.card", "CardProposerFactory", False),
}


def load_factory(config: DrafterConfig) -> ProposerFactory | None:
    """The factory for one configured drafter (loads its weights), or None if its kind's
    module does not exist in this build."""
    module_name, class_name, required = _FACTORIES[config.kind]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if required or e.name != module_name:
            raise
        logger.warning("drafter %r skipped: kind %r is not available (%s)", config.name, config.kind, e)
        return None
    return getattr(module, class_name)(config)


def _in_inference_mode(fn: Callable[..., T], *args) -> T:
    # NOTE: inference_mode is thread-local, so it is entered in the executor thread itself.
    with torch.inference_mode():
        return fn(*args)


@dataclass(slots=True)
class _Drafter:
    name: str
    method: str
    factory: ProposerFactory
    tokenizer_hash: str


class DraftSession:
    """One open session, itself a `Proposer`: the drafter's proposer behind a lock so
    propose and close never overlap (a cancelled stream may close while its last propose
    still runs in an executor thread). Every method blocks: call them in the executor."""

    __slots__ = ("drafter", "target", "proposer", "_lock", "_closed", "_pool")

    def __init__(self, pool: DrafterPool, drafter: str, target: str, proposer: Proposer) -> None:
        self._pool = pool
        self.drafter = drafter
        self.target = target
        self.proposer = proposer
        self._lock = threading.Lock()
        self._closed = False

    def propose(self, context_ids: Sequence[int], k: int) -> Draft:
        with self._lock:
            if self._closed:
                return EMPTY_DRAFT
            return self.proposer.propose(context_ids, k)

    def update(self, num_accepted: int) -> None:
        with self._lock:
            if not self._closed:
                self.proposer.update(num_accepted)

    def set_params(self, params: dict[str, float]) -> None:
        """Per-session parameters from the verifier's policy (Commit.params), for proposers
        that take them (`set_params`, e.g. sorted exit thresholds); ignored otherwise."""
        with self._lock:
            set_params = getattr(self.proposer, "set_params", None)
            if not self._closed and set_params is not None:
                set_params(params)

    def close(self) -> None:
        """Free the proposer's state; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.proposer.close()
            finally:
                self._pool._session_closed(self)


class DrafterPool:
    """Drafters by name; `open_session` validates an Open and makes a `DraftSession`."""

    def __init__(self, drafters: Sequence[_Drafter], *, max_workers: int = 8) -> None:
        if not drafters:
            raise ValueError("a drafter pool needs at least one drafter")
        self._drafters: dict[str, _Drafter] = {d.name: d for d in drafters}
        if len(self._drafters) != len(drafters):
            raise ValueError(f"duplicate drafter names in {[d.name for d in drafters]}")
        self.executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="drafter")
        self._lock = threading.Lock()
        self._active = 0

    @classmethod
    def from_factories(
        cls, factories: Mapping[str, ProposerFactory], tokenizer_hashes: Mapping[str, str], **kwargs
    ) -> DrafterPool:
        drafters = [
            _Drafter(name, f.method, f, tokenizer_hashes[name]) for name, f in factories.items()
        ]
        return cls(drafters, **kwargs)

    @classmethod
    def load(cls, configs: Sequence[DrafterConfig], **kwargs) -> DrafterPool:
        """Load every configured drafter (slow: run it off the event loop)."""
        from shared.loading import tokenizer_hash

        drafters = []
        for config in configs:
            factory = load_factory(config)
            if factory is None:
                continue
            tok_hash = getattr(factory, "tokenizer_hash", None) or tokenizer_hash(config.model_dir)
            drafters.append(_Drafter(config.name, factory.method, factory, tok_hash))
            logger.info("drafter %r loaded: method=%s tokenizer_hash=%s", config.name, factory.method, tok_hash)
        return cls(drafters, **kwargs)

    # ---------------------------------------------------------------- what it serves

    @property
    def drafter_names(self) -> list[str]:
        return list(self._drafters)

    @property
    def methods(self) -> list[str]:
        return sorted({d.method for d in self._drafters.values()})

    @property
    def tokenizer_hashes(self) -> set[str]:
        return {d.tokenizer_hash for d in self._drafters.values()}

    @property
    def tokenizer_hash(self) -> str:
        """The pool's tokenizer hash (ValueError if its drafters do not share one)."""
        hashes = self.tokenizer_hashes
        if len(hashes) != 1:
            raise ValueError(f"drafters have different tokenizer hashes: {sorted(hashes)}")
        return next(iter(hashes))

    @property
    def active_sessions(self) -> int:
        return self._active

    # ---------------------------------------------------------------- sessions

    def resolve(
        self, protocol_version: int, tokenizer_hash: str, method: str, drafter: str = ""
    ) -> _Drafter:
        """The drafter an Open asks for, or the domain error that rejects it."""
        if protocol_version != PROTOCOL_VERSION:
            raise FailedPreconditionError(
                f"protocol version {protocol_version} is not this drafter's {PROTOCOL_VERSION}",
                field="protocol_version",
            )
        if method not in SPEC_METHODS:
            raise InvalidArgumentError(f"unknown method {method!r}", field="method")
        if method not in MODEL_METHODS:
            raise InvalidArgumentError(
                f"method {method!r} runs inside the verifier, not in the drafter pool", field="method"
            )
        if drafter:
            found = self._drafters.get(drafter)
            if found is None:
                raise NotFoundError(
                    f"drafter {drafter!r} is not in this pool ({self.drafter_names})", field="drafter"
                )
            if found.method != method:
                raise InvalidArgumentError(
                    f"drafter {drafter!r} serves {found.method!r}, not {method!r}", field="method"
                )
            candidates = [found]
        else:
            candidates = [d for d in self._drafters.values() if d.method == method]
            if not candidates:
                raise NotFoundError(
                    f"no drafter serves method {method!r} (pool serves {self.methods})", field="method"
                )
        for d in candidates:
            if d.tokenizer_hash == tokenizer_hash:
                return d
        raise FailedPreconditionError(
            f"tokenizer hash {tokenizer_hash!r} differs from the drafter's "
            f"{sorted({d.tokenizer_hash for d in candidates})}: the target and the drafter "
            "must share one tokenizer",
            field="tokenizer_hash",
        )

    def open_session(
        self,
        target: str,
        tokenizer_hash: str,
        protocol_version: int,
        method: str,
        drafter: str,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
    ) -> DraftSession:
        """Validate an Open and make its session (blocking: call it in the executor)."""
        chosen = self.resolve(protocol_version, tokenizer_hash, method, drafter)
        proposer = chosen.factory.new_session(prompt_ids, sampling)
        session = DraftSession(self, chosen.name, target, proposer)
        with self._lock:
            self._active += 1
        metrics.NUM_ACTIVE_SESSIONS.labels("drafter", chosen.name).inc()
        return session

    def _session_closed(self, session: DraftSession) -> None:
        with self._lock:
            self._active -= 1
        metrics.NUM_ACTIVE_SESSIONS.labels("drafter", session.drafter).dec()

    # ---------------------------------------------------------------- executor

    async def run(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` in the pool's executor under `torch.inference_mode()`."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, _in_inference_mode, fn, *args)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
