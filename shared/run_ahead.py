"""Run-ahead drafting (method `card`): the drafter's *line* and how both ends keep it.

A run-ahead session (CARD, arXiv 2508.04462) does not draft when asked: the drafter extends
its line (the verifier's context + tokens drafted after it) continuously, in chunks, up to
`ahead_limit(k)` tokens past the context, and streams every chunk as Candidates{epoch,
start_position, token_ids}: "the line as of commit `epoch` continues at `start_position`
with these tokens". The verifier keeps a mirror of the line and verifies, each round, what
the mirror already holds after its context, waiting at most a small budget.

Commits carry the verifier's context after each round (accepted drafts + the target's
bonus token). Both ends apply a commit to the line with the same rule, `reconcile`: a line
that agrees with the new context keeps what it drafted beyond it (the bonus token was the
line's own next token: the run-ahead work is still good, the next round finds it cached),
any other line restarts at the context. A context only grows (emitted tokens are final),
so applying commits e and e + 1 in turn equals applying e + 1 alone: the verifier may apply
pending commits lazily, when a chunk of a later epoch arrives, and both ends stay
identical without acknowledging anything. Chunks of an epoch the drafter had not yet seen
a commit for stay valid when they continue a line that the later commit keeps.

A Commit asking for 0 tokens stops the run-ahead until a later Commit asks again (the
verifier's policy steps `card` aside under load).
"""

from __future__ import annotations


def extends(line: list[int], context: list[int]) -> bool:
    """Whether the line begins with the whole context (the commit rule's test)."""
    n = len(context)
    return len(line) >= n and line[:n] == context


def reconcile(line: list[int], context: list[int]) -> list[int]:
    """The line after a commit of `context`: kept when it extends the context, else the
    context itself (a new list; neither argument is modified)."""
    return list(line) if extends(line, context) else list(context)


# Runner-up children kept beside each line token (the drafter's tree, `shared.draft_tree`):
# they come from the forward that chose the line token, so they cost no extra forward.
RUN_AHEAD_ALTERNATIVES = 1


def ahead_limit(k: int) -> int:
    """How far past the context the drafter runs when the verifier asks for k tokens a
    round: this round's k and the next round's, so a round that accepts everything finds
    the next one already drafted."""
    return 2 * k
