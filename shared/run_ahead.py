"""Run-ahead drafting (method `card`): how far the drafter runs ahead and what it drafts.

A run-ahead session (CARD, arXiv 2508.04462) does not draft when asked: the drafter grows
a tree (`shared.draft_tree.RunAheadTree`) continuously, in chunks, and streams every chunk
as Candidates{epoch, start_position, token_ids, tree_parents, node_probs}: "the tree as of
commit `epoch` grows at `start_position` by these nodes". A chunk at the line's end extends
the line (`ahead_limit(k)` tokens past the context at most) with the runner-up children of
its tokens; a chunk before it is a branch drafted under one of those alternatives
(`branches_to_draft`; how many: `DrafterConfig.run_ahead`). The verifier keeps a mirror of the tree and verifies, each round,
what the mirror already holds after its context, waiting at most a small budget.

Commits carry the verifier's context after each round (accepted drafts + the target's
bonus token). Both ends apply a commit with the same rule, `RunAheadTree.commit`: keep the
line where it extends the new context (the bonus was the line's own next token), else take
the branch whose path does (the target took an alternative the drafter prepared for), else
restart at the context. A context only grows (emitted tokens are final) and no commit
drops a path that extends a later context, so applying commits e and e + 1 in turn equals
applying e + 1 alone: the verifier applies pending commits lazily, when a chunk of a later
epoch arrives, and both ends stay identical without acknowledging anything.

A Commit asking for 0 tokens stops the run-ahead until a later Commit asks again (the
verifier's policy steps `card` aside under load).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.draft_tree import RunAheadTree


def extends(line: list[int], context: list[int]) -> bool:
    """Whether the line begins with the whole context (the commit rule's test)."""
    n = len(context)
    return len(line) >= n and line[:n] == context


def ahead_limit(k: int) -> int:
    """How far past the context the drafter runs when the verifier asks for k tokens a
    round: this round's k and the next round's, so a round that accepts everything finds
    the next one already drafted."""
    return 2 * k


def branches_to_draft(tree: RunAheadTree, base: int, k: int, max_branches: int) -> list[tuple[int, int]]:
    """The (position, alternative) branches still to draft for the round in flight, which
    verifies at most k nodes after the first `base` tokens: among the alternatives at
    positions base .. base + k (a rejection at any depth, or a bonus token after k
    accepted), the `max_branches` likeliest by path probability, minus those drafted."""
    if k <= 0 or max_branches <= 0:
        return []
    scored = []
    path = 1.0
    for p in range(base, min(len(tree.line), base + k + 1)):
        scored.extend((path * q, p, alt) for alt, q in tree.alternatives.get(p, ()))
        path *= tree.line_probs.get(p, 1.0)
    scored.sort(key=lambda s: -s[0])
    return [(p, alt) for _, p, alt in scored[:max_branches] if (p, alt) not in tree.branches]
