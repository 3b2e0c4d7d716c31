"""Draft trees: several candidate continuations verified in one target forward.

A tree travels as parallel lists over its nodes in topological order (a parent before its
children): `token_ids`, `parents` (index of the parent node, -1 = the last context token,
i.e. the row's pending token in the verify forward) and, where the drafter knows them,
`probs` (each node's draft probability q given its parent).

`card`'s tree (`RunAheadTree`) is a *line* (the drafter's best path, extended run-ahead)
with the runner-up children of each line node kept as leaves: the drafter computes them in
the same forward as the line token (no extra forward), and where the target rejects the
line token they are the likeliest corrections. Each round the verifier picks, best-first by
path probability, at most `budget` nodes of the tree after its context (`select`), verifies
them in one forward (tree attention: each node sees its ancestors only, at the position of
its depth) and accepts the longest path whose every token is the target's own
(`accept_path`).

Lossless (DESIGN.md): every tree node is a deterministic draft (one-hot q). At each node on
the path the target chooses y exactly as without drafting (argmax, or a draw from p with the
(seed, position) noise of the node's depth) and descends into the child equal to y; the
first node without such a child emits y as the correction/bonus. The emitted sequence is
therefore the target's own, token by token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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


@dataclass(slots=True)
class RunAheadTree:
    """`card`'s run-ahead tree after a context: `line` = the context followed by the drafted
    line; `line_probs[p]` = q of the line token at position p; `alternatives[p]` = the other
    children (token, q) of the node at position p - 1, best first, kept as leaves."""

    line: list[int] = field(default_factory=list)
    line_probs: dict[int, float] = field(default_factory=dict)
    alternatives: dict[int, list[tuple[int, float]]] = field(default_factory=dict)

    def reset(self, context: list[int]) -> None:
        self.line = list(context)
        self.line_probs.clear()
        self.alternatives.clear()

    def commit(self, context: Sequence[int]) -> bool:
        """Prune to an accepted context: keep what lies beyond it when the line extends it
        (the target's bonus token was the line's own), else restart at the context. True
        when kept. A context only grows, so commits applied in turn equal the last alone.
        The line follows `shared.run_ahead`'s commit rule, as the drafter's does."""
        context = list(context)
        if not extends(self.line, context):
            self.reset(context)
            return False
        n = len(context)
        for table in (self.line_probs, self.alternatives):
            for p in [p for p in table if p < n]:
                del table[p]
        return True

    def extend(
        self, start: int, token_ids: Sequence[int], parents: Sequence[int], probs: Sequence[float]
    ) -> bool:
        """Expand: a chunk of nodes whose root (-1) is the line token at `start - 1`. The
        first child of each line node extends the line; the others are its alternatives.
        False (nothing applied) when `start` is not the line's end."""
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
            # a child of an alternative: this tree keeps alternatives as leaves
        return True

    def child(self, position: int, token: int) -> bool:
        """Whether `token` is a child of the node at `position - 1` (line or alternative)."""
        if position < len(self.line) and self.line[position] == token:
            return True
        return any(t == token for t, _ in self.alternatives.get(position, ()))

    def select(self, context_len: int, budget: int) -> TreeDraft:
        """At most `budget` nodes after the first `context_len` tokens of the line, best-first
        by path probability (a node before its children: a child's path probability is at
        most its parent's), line nodes first, alternatives after, parents before children."""
        if budget <= 0 or len(self.line) <= context_len:
            return TreeDraft([], [])
        nodes: list[tuple[float, int, int, int, int]] = []  # (path prob, depth, is_alt, position, token)
        path = 1.0
        end = min(len(self.line), context_len + budget)
        for p in range(context_len, end):
            depth = p - context_len + 1
            for tok, q in self.alternatives.get(p, ()):
                nodes.append((path * q, depth, 1, p, tok))
            path *= self.line_probs.get(p, 1.0)
            nodes.append((path, depth, 0, p, self.line[p]))
        nodes.sort(key=lambda n: (-n[0], n[1], n[2]))
        chosen = nodes[:budget]
        # line nodes are a prefix of the line: the chosen ones are contiguous from the context
        line_len = sum(1 for n in chosen if n[2] == 0)
        token_ids = self.line[context_len : context_len + line_len]
        parents = list(range(-1, line_len - 1))
        for _, depth, is_alt, p, tok in sorted((n for n in chosen if n[2]), key=lambda n: n[1]):
            if depth - 1 > line_len:  # its parent was not chosen (a tie broken the other way)
                continue
            token_ids.append(tok)
            parents.append(depth - 2)  # the line node at depth - 1 (-1: the root)
        return TreeDraft(token_ids, parents)
