"""Version of the DrafterService session protocol (Open/Commit/Candidates semantics).

Bump it when the meaning of a message changes in a way field numbers cannot express
(e.g. what `accepted_length` counts); a drafter rejects an Open whose version differs
with FAILED_PRECONDITION, and the verifier then decodes with k = 0.
"""

from __future__ import annotations

# 2: run-ahead sessions (method `card`, `shared.run_ahead`): Candidates continue the
#    drafter's line of an epoch, unasked, and a Commit for 0 tokens stops the run-ahead.
# 3: run-ahead Candidates carry a tree (tree_parents, node_probs): the line plus the
#    runner-up children of each line token.
# 4: a run-ahead chunk that starts before the line's end is a branch: a chain from one of
#    the line's alternatives, and a commit may take it (`RunAheadTree.commit`).
PROTOCOL_VERSION = 4
