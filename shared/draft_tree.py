"""Draft trees: several candidate continuations verified in one target forward.

A tree travels as parallel lists over its nodes in topological order (a parent before its
children): `token_ids`, `parents` (index of the parent node, -1 = the last context token,
i.e. the row's pending token in the verify forward) and, where the drafter knows them,
`probs` (each node's draft probability q given its parent).

`card`'s tree (`RunAheadTree`) is a *line* (the drafter's best path, extended run-ahead)
with the runner-up children of each line node (the drafter computes them in the same
forward as the line token: no extra forward; where the target rejects the line token they
are the likeliest corrections) and, under the likeliest of those, a short *branch* drafted
ahead while the target verifies (CARD's prepared outcomes: when the target takes the
alternative, the next round finds its draft already there). Each round the verifier picks,
best-first by path probability, at most `budget` nodes of the tree after its context
(`select`), verifies them in one forward (tree attention: each node sees its ancestors
only, at the position of its depth) and accepts the longest path whose every token is the
target's own (`accept_path`).

Lossless (DESIGN.md): every tree node is a deterministic draft (one-hot q). At each node on
the path the target chooses y exactly as without drafting (argmax, or a draw from p with the
(seed, position) noise of the node's depth) and descends into the child equal to y; the
first node without such a child emits y as the correction/bonus. The emitted sequence is
therefore the target's own, token by token.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from shared.proposer import common_prefix_len
from shared.run_ahead import extends


def depths_of(parents: Sequence[int]) -> list[int]:
    """Depth of each node (1 = a child of the root); parents precede their children."""
    depths: list[int] = []
    for i, p in enumerate(parents):
        assert -1 <= p < i, (i, p)
        depths.append(1 if p < 0 else depths[p] + 1)
    return depths


def accept_path(
    token_ids: Sequence[int],  # [n] the verified nodes
    parents: Sequence[int],  # [n] -1 = the root (pending token)
    target_ids: Sequence[int],  # [n + 1] the target's token after the root, then after each node
) -> list[int]:
    """Indices of the accepted nodes, root to leaf: from the root, descend into the child
    whose token equals the target's token there; stop at the first node without one."""
    assert len(target_ids) == len(token_ids) + 1, (len(token_ids), len(target_ids))
    path: list[int] = []
    node = -1
    want = target_ids[0]
    for i, (tok, p) in enumerate(zip(token_ids, parents)):
        # children follow their parent, so one forward scan finds the path
        if p == node and tok == want:
            path.append(i)
            node, want = i, target_ids[i + 1]
    return path


def is_chain(parents: Sequence[int]) -> bool:
    return all(p == i - 1 for i, p in enumerate(parents))


@dataclass(slots=True)
class TreeDraft:
    """A tree chosen for one round (see the module docstring for the encoding)."""

    token_ids: list[int]
    parents: list[int]


class Commit(enum.Enum):
    """What a commit did to a `RunAheadTree` (both ends compute the same)."""

    KEPT = "kept"  # the line extends the context: everything beyond it stays
    BRANCHED = "branched"  # the context went through an alternative whose branch extends it
    RESTARTED = "restarted"  # nothing drafted extends the context: the line starts over


@dataclass(slots=True)
class RunAheadTree:
    """`card`'s run-ahead tree after a context: `line` = the context followed by the drafted
    line; `line_probs[p]` = q of the line token at position p; `alternatives[p]` = the other
    children (token, q) of the node at position p - 1, best first; `branches[(p, a)]` = the
    chain (token, q) the drafter drafted after alternative `a` at position p (CARD's
    prepared outcomes: where the target takes `a`, the next round is already drafted)."""

    line: list[int] = field(default_factory=list)
    line_probs: dict[int, float] = field(default_factory=dict)
    alternatives: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    branches: dict[tuple[int, int], list[tuple[int, float]]] = field(default_factory=dict)

    def reset(self, context: Sequence[int]) -> None:
        self.line = list(context)
        self.line_probs.clear()
        self.alternatives.clear()
        self.branches.clear()

    def copy(self) -> RunAheadTree:
        """A copy to commit and select from (never to extend: alternatives lists are shared)."""
        return RunAheadTree(list(self.line), dict(self.line_probs), dict(self.alternatives), dict(self.branches))

    def branch_taken(self, context: Sequence[int]) -> tuple[int, int] | None:
        """The branch (position, alternative) whose path extends `context` where the line
        does not, else None."""
        p = common_prefix_len(self.line, context)
        if p >= len(context):
            return None
        key = (p, context[p])
        chain = self.branches.get(key)
        if chain is None:
            return None
        return key if extends([t for t, _ in chain], list(context[p + 1 :])) else None

    def commit(self, context: Sequence[int]) -> Commit:
        """Prune to an accepted context (the commit rule of both ends, `shared.run_ahead`):
        keep the line where it extends the context; else take the branch whose path does;
        else restart at the context. Only nodes beyond the context survive. A context only
        grows and no rule drops a path that extends it, so commits applied in turn equal
        the last alone."""
        context = list(context)
        n = len(context)
        if extends(self.line, context):
            outcome = Commit.KEPT
        elif (key := self.branch_taken(context)) is not None:
            p, alt = key
            chain = self.branches[key]
            q_alt = next(q for t, q in self.alternatives[p] if t == alt)
            self.line = self.line[:p] + [alt] + [t for t, _ in chain]
            self.line_probs = {p: q_alt} | {p + 1 + j: q for j, (_, q) in enumerate(chain)}
            self.alternatives.clear()  # they hung under the old line beyond p, or before the context
            self.branches.clear()
            outcome = Commit.BRANCHED
        else:
            self.reset(context)
            return Commit.RESTARTED
        self.line_probs = {p: q for p, q in self.line_probs.items() if p >= n}
        self.alternatives = {p: alts for p, alts in self.alternatives.items() if p >= n}
        self.branches = {key: chain for key, chain in self.branches.items() if key[0] >= n}
        return outcome

    def extend(
        self, start: int, token_ids: Sequence[int], parents: Sequence[int], probs: Sequence[float]
    ) -> bool:
        """Expand. A chunk at the line's end (`start == len(line)`): its root (-1) is the
        line token at `start - 1`; the first child of each line node extends the line, the
        others are its alternatives. A chunk before the end is a branch: a chain whose
        first node is an alternative at `start`, then what was drafted after it (replacing
        an earlier branch there). False (nothing applied) when it fits neither."""
        if start < len(self.line):
            return self._extend_branch(start, token_ids, parents, probs)
        if start != len(self.line):
            return False
        line_index = -1  # chunk index of the line's last node so far (-1: the root)
        on_line: dict[int, int] = {-1: start - 1}  # chunk index -> position, line nodes only
        for i, (tok, parent) in enumerate(zip(token_ids, parents)):
            q = float(probs[i]) if i < len(probs) else 1.0
            if parent == line_index:
                position = len(self.line)
                self.line.append(int(tok))
                self.line_probs[position] = q
                on_line[i] = position
                line_index = i
            elif parent in on_line:
                self.alternatives.setdefault(on_line[parent] + 1, []).append((int(tok), q))
            # a child of an alternative: branches come in chunks of their own
        return True

    def _extend_branch(
        self, start: int, token_ids: Sequence[int], parents: Sequence[int], probs: Sequence[float]
    ) -> bool:
        if not token_ids or not is_chain(parents):
            return False
        alt = int(token_ids[0])
        if not any(t == alt for t, _ in self.alternatives.get(start, ())):
            return False
        q = [float(probs[i]) if i < len(probs) else 1.0 for i in range(len(token_ids))]
        self.branches[(start, alt)] = [(int(t), q[i]) for i, t in enumerate(token_ids) if i > 0]
        return True

    def child(self, position: int, token: int) -> bool:
        """Whether `token` is a child of the node at `position - 1` (line or alternative)."""
        if position < len(self.line) and self.line[position] == token:
            return True
        return any(t == token for t, _ in self.alternatives.get(position, ()))

    def select(self, context_len: int, budget: int) -> TreeDraft:
        """At most `budget` nodes after the first `context_len` tokens of the line, best-first
        by path probability (the product of q from the context). A child's path probability
        is at most its parent's and its depth greater, so the chosen nodes include each
        one's parent. Line nodes come first (a chain from the context), then the others by
        depth, parents before children."""
        if budget <= 0 or len(self.line) <= context_len:
            return TreeDraft([], [])
        # (path prob, depth, is_off_line, key, parent key, token); keys: ("L", p) a line
        # node, ("A", p, a) an alternative, ("B", p, a, j) the j-th node of its branch
        nodes: list[tuple[float, int, bool, tuple, tuple | None, int]] = []
        path = 1.0
        for p in range(context_len, min(len(self.line), context_len + budget)):
            depth = p - context_len + 1
            parent = ("L", p - 1) if p > context_len else None
            for alt, q in self.alternatives.get(p, ()):
                below = path * q
                nodes.append((below, depth, True, ("A", p, alt), parent, alt))
                up: tuple = ("A", p, alt)
                for j, (tok, qb) in enumerate(self.branches.get((p, alt), ())[: budget - depth]):
                    below *= qb
                    nodes.append((below, depth + j + 1, True, ("B", p, alt, j), up, tok))
                    up = ("B", p, alt, j)
            path *= self.line_probs.get(p, 1.0)
            nodes.append((path, depth, False, ("L", p), parent, self.line[p]))
        nodes.sort(key=lambda n: (-n[0], n[1], n[2]))
        chosen = sorted(nodes[:budget], key=lambda n: (n[2], n[1]))  # line first, then by depth
        index = {n[3]: i for i, n in enumerate(chosen)}
        assert all(n[4] is None or n[4] in index for n in chosen), "a node without its parent"
        return TreeDraft([n[5] for n in chosen], [-1 if n[4] is None else index[n[4]] for n in chosen])
