"""Sessions of a nested drafter (`nested_model.NestedDrafter`), shared by `draft_model` (one
exit) and `sorted` (S2D, several exits).

`NestedProposerFactory` holds one drafter (weights loaded once) for every session of its
method. Each session (`NestedProposer`) owns a KV cache; `propose(context, k)` reconciles it
with the verifier's accepted context (longest common prefix; the last context token is
always re-run) and drafts k tokens, each leaving at the shallowest exit whose confidence
clears its threshold (see `nested_model` for the rule and the lazy-fill KV scheme).

- greedy sessions draft by argmax: `draft_probs=None` (q is one-hot);
- seeded sampled sessions (the verifier seeds every sampled request) draw from q = the
  emitting exit's distribution after the session's temperature/top-p/top-k with the
  target's own noise at each position (`shared.sampling.position_noise`), so the draft
  is the target's draw wherever q is close to p; q is not returned (one-hot);
- unseeded sampled sessions draw from q at random and return q [k, vocab].

Per-token exit depths are in `Draft.exit_layers` (and `proposer.last_exit_layers`);
`Draft.info` carries the mean exit depth and per-exit counts. Thresholds are per session
(`set_params` with the `fixed_exit` / `threshold.<exit>` keys of `shared.proposer`, or
`set_thresholds` / `set_fixed_exit`), because the verifier's policy picks them per target.
`propose_batch` drafts for several sessions in one set of layer calls (rows of all
sessions share each matmul; only attention runs per session).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from drafter_service.nested_model import (
    DraftLane,
    NestedDrafter,
    NestedState,
    fixed_exit_thresholds,
    thresholds_list,
)
from shared.proposer import Draft, common_prefix_len

if TYPE_CHECKING:
    from shared.config import DrafterConfig
    from shared.types import SamplingParams


def check_tokenizer(drafter_hash: str, target_hash: str, drafter: str, target: str) -> None:
    """A drafter attaches only to a target with the same tokenizer (start-up check)."""
    if drafter_hash != target_hash:
        raise ValueError(
            f"drafter {drafter!r} (tokenizer_hash {drafter_hash}) cannot serve target "
            f"{target!r} (tokenizer_hash {target_hash}): their tokenizers differ"
        )


class NestedProposer:
    """One session of a nested drafter."""

    def __init__(
        self, factory: NestedProposerFactory, sampling: SamplingParams, state: NestedState | None = None
    ) -> None:
        self.factory = factory
        self.drafter = factory.drafter
        self.sampling = sampling
        self.state = state if state is not None else self.drafter.new_state()
        self.thresholds = list(factory.default_thresholds)  # [num_exits], deepest = 0
        self.params: dict[str, float] = {}  # sticky set_params keys applied so far
        self.last_exit_layers: list[int] = []  # exit depth of each token of the last draft
        self.num_drafted = {e: 0 for e in self.drafter.exits}  # per exit, this session
        self.num_accepted = {e: 0 for e in self.drafter.exits}
        # runner-up children kept per draft token (card's tree, `shared.draft_tree`): the
        # draft is then a tree, its line first, each runner-up a leaf beside its line token
        self.num_alternatives = 0

    # ------------------------------------------------------------------ thresholds

    def set_thresholds(self, thresholds: dict[int, float]) -> None:
        """Confidence threshold per exit (missing: never exit there; deepest always emits)."""
        self.thresholds = thresholds_list(self.drafter.exits, thresholds)

    def set_fixed_exit(self, exit_layer: int) -> None:
        """Every token leaves at `exit_layer`; deeper layers are not run."""
        self.set_thresholds(fixed_exit_thresholds(self.drafter.exits, exit_layer))

    def reset_thresholds(self) -> None:
        self.thresholds = list(self.factory.default_thresholds)
        self.params = {}

    def set_params(self, params: dict[str, float]) -> None:
        """The verifier policy's parameters (sticky per key; see `shared.proposer.Proposer`):
        `fixed_exit` >= 0 pins the exit, else `threshold.<exit>` keys override the default
        thresholds of their exits. Raises ValueError for an unknown key or exit (and then
        changes nothing)."""
        merged = {**self.params, **params}
        exits = self.drafter.exits
        thresholds = dict(zip(exits, self.factory.default_thresholds))
        fixed = -1
        for key, value in merged.items():
            if key == "fixed_exit":
                fixed = int(value)
                if fixed >= 0 and fixed not in exits:
                    raise ValueError(f"fixed_exit {fixed} is not one of the exits {exits}")
                continue
            name, _, exit_layer = key.partition(".")
            if name != "threshold" or not exit_layer.isdigit() or int(exit_layer) not in exits:
                raise ValueError(
                    f"unknown nested drafter parameter {key!r} (keys: fixed_exit, "
                    f"threshold.<exit> with exits {exits})"
                )
            thresholds[int(exit_layer)] = float(value)
        if fixed >= 0:
            self.set_fixed_exit(fixed)
        else:
            self.set_thresholds(thresholds)
        self.params = merged

    # ------------------------------------------------------------------ Proposer

    def propose(self, context_ids: Sequence[int], k: int) -> Draft:
        return propose_batch([(self, context_ids, k)])[0]

    def update(self, num_accepted: int) -> None:
        for e in self.last_exit_layers[:num_accepted]:
            self.num_accepted[e] += 1

    def close(self) -> None:
        self.state = None
        self.last_exit_layers = []

    def fork(self) -> NestedProposer:
        """A session on a copy of this one's cache, thresholds and sampling (`card` drafts a
        branch on it while this session keeps the line); `adopt` takes it back."""
        assert self.state is not None, "fork after close"
        other = NestedProposer(self.factory, self.sampling, self.drafter.copy_state(self.state))
        other.thresholds, other.params = list(self.thresholds), dict(self.params)
        other.num_alternatives = self.num_alternatives
        return other

    def adopt(self, fork: NestedProposer) -> None:
        """Continue from a fork's cache (the target took the branch drafted on it)."""
        self.state = fork.state

    def _lane(self, context_ids: Sequence[int], k: int) -> DraftLane | None:
        assert self.state is not None, "propose after close"
        k = min(k, self.drafter.max_positions - len(context_ids))
        if k <= 0 or not context_ids:
            return None
        keep = min(common_prefix_len(self.state.token_ids, context_ids), len(context_ids) - 1)
        self.drafter.reconcile(self.state, context_ids, keep)
        return DraftLane(
            state=self.state, k=k, thresholds=self.thresholds, sampling=self.sampling,
            num_alternatives=self.num_alternatives,
        )

    def _finish(self, lane: DraftLane | None) -> Draft:
        if lane is None or not lane.token_ids:
            self.last_exit_layers = []
            return Draft(token_ids=[])
        self.last_exit_layers = lane.exit_layers
        info: dict[str, float] = {
            "mean_exit_layer": sum(lane.exit_layers) / len(lane.exit_layers)
        }
        for e in self.drafter.exits:
            n = lane.exit_layers.count(e)
            self.num_drafted[e] += n
            info[f"num_exit_{e}"] = float(n)
        probs = torch.stack(lane.draft_probs) if lane.draft_probs else None
        draft = Draft(
            token_ids=lane.token_ids, draft_probs=probs, info=info,
            exit_layers=list(lane.exit_layers),
        )
        if lane.alternatives:
            _as_tree(draft, lane)
        return draft


def _as_tree(draft: Draft, lane: DraftLane) -> None:
    """The line with each token's runner-ups as leaves beside it (`shared.draft_tree`)."""
    n = len(lane.token_ids)
    ids, parents, probs = list(lane.token_ids), list(range(-1, n - 1)), list(lane.token_probs)
    for i, alts in enumerate(lane.alternatives):
        for tok, q in alts:
            ids.append(tok)
            parents.append(i - 1)
            probs.append(q)
    draft.token_ids, draft.tree_parents, draft.node_probs = ids, parents, probs
    draft.exit_layers = None  # per line token only; the tree's nodes have none


def propose_batch(
    requests: Sequence[tuple[NestedProposer, Sequence[int], int]],  # (session, context, k)
) -> list[Draft]:
    """Draft for several sessions of one drafter at once (same results as one by one)."""
    if not requests:
        return []
    drafter = requests[0][0].drafter
    assert all(p.drafter is drafter for p, _, _ in requests), "one drafter per batch"
    assert len({id(p) for p, _, _ in requests}) == len(requests), "a session twice in a batch"
    with torch.inference_mode():
        lanes = [p._lane(ctx, k) for p, ctx, k in requests]
        active = [lane for lane in lanes if lane is not None]
        if active:
            drafter.draft(active)
        return [p._finish(lane) for (p, _, _), lane in zip(requests, lanes)]


class NestedProposerFactory:
    """One nested drafter (weights loaded once) shared by every session of its method;
    sessions of one drafter draft together through `propose_batch`."""

    method: str

    def __init__(
        self, config: DrafterConfig, drafter: NestedDrafter, tokenizer_hash_: str, thresholds: dict[int, float]
    ) -> None:
        self.config = config
        self.drafter = drafter
        self.tokenizer_hash = tokenizer_hash_
        self.exits = list(drafter.exits)
        self.default_thresholds = thresholds_list(self.exits, thresholds)
        self.targets: dict[str, str] = {}  # attached target name -> tokenizer hash
        self.vocab_size = drafter.vocab_size

    def attach_target(self, name: str, target_tokenizer_hash: str) -> None:
        """Register a target this drafter serves; a different tokenizer is a config error."""
        check_tokenizer(self.tokenizer_hash, target_tokenizer_hash, self.config.name, name)
        self.targets[name] = target_tokenizer_hash

    def new_session(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> NestedProposer:
        return NestedProposer(self, sampling)

    propose_batch = staticmethod(propose_batch)
