"""Draft trees (`shared.draft_tree`) on tiny hand-built trees: the accepted path, card's
run-ahead tree (expand, prune to an accepted context, look up a child, best-first
selection within a budget) and a tree grown across commits equal to one grown from
scratch."""

from __future__ import annotations

import pytest

from shared.draft_tree import RunAheadTree, accept_path, depths_of, is_chain


def test_depths_and_chains():
    assert depths_of([-1, 0, 1, 0, 3]) == [1, 2, 3, 2, 3]
    assert is_chain([-1, 0, 1]) and not is_chain([-1, 0, 0])


@pytest.mark.parametrize(
    "target, path",
    [
        ([1, 2, 3, 9], [0, 1, 2]),  # the whole first branch, then the bonus
        ([1, 5, 0, 0, 6, 9, 9], [0, 3, 4]),  # the alternative at depth 2, then its child
        ([1, 7, 0, 0, 0, 0, 0], [0]),  # no child equals the target's token: a correction
        ([8, 0, 0, 0, 0, 0, 0], []),  # the root's first child is wrong
    ],
)
def test_accept_path_descends_into_the_child_equal_to_the_target(target, path):
    tokens, parents = [1, 2, 3, 5, 6, 4], [-1, 0, 1, 0, 3, 1]
    target = (target + [0] * 7)[:7]
    assert accept_path(tokens, parents, target) == path


def _tree(context):
    tree = RunAheadTree()
    tree.reset(context)
    # line a=10, b=11 after the context; 20 is the alternative of 10 and 21 of 11
    assert tree.extend(len(context), [10, 11, 20, 21], [-1, 0, -1, 0], [0.6, 0.9, 0.3, 0.05])
    return tree


def test_extend_commit_and_child_lookup():
    tree = _tree([1, 2])
    assert tree.line == [1, 2, 10, 11]
    assert tree.alternatives == {2: [(20, 0.3)], 3: [(21, 0.05)]}
    assert tree.child(2, 20) and tree.child(2, 10) and not tree.child(2, 11)
    assert not tree.extend(3, [12], [-1], [0.5])  # not at the line's end: ignored
    assert tree.commit([1, 2, 10])  # the target's bonus was the line's token: kept, pruned
    assert tree.line == [1, 2, 10, 11] and tree.alternatives == {3: [(21, 0.05)]}
    assert not tree.commit([1, 2, 10, 21])  # a correction: restart at the context
    assert tree.line == [1, 2, 10, 21] and not tree.alternatives and not tree.line_probs


def test_select_is_best_first_within_the_budget():
    tree = _tree([1, 2])
    # path probabilities: 10 -> 0.6, 20 -> 0.3, 11 -> 0.54, 21 -> 0.03
    assert tree.select(2, 1).token_ids == [10]
    two = tree.select(2, 2)
    assert (two.token_ids, two.parents) == ([10, 11], [-1, 0])
    three = tree.select(2, 3)
    assert (three.token_ids, three.parents) == ([10, 11, 20], [-1, 0, -1])
    four = tree.select(2, 4)
    assert (four.token_ids, four.parents) == ([10, 11, 20, 21], [-1, 0, -1, 0])
    assert tree.select(4, 3).token_ids == [] and tree.select(2, 0).token_ids == []
    assert tree.select(3, 2).token_ids == [11, 21]  # after a longer context


def test_grown_across_commits_equals_grown_from_scratch():
    """The same expansions and the same accepted context give the same tree whether the
    commits came between the expansions or after all of them."""
    chunks = [([10, 11, 20, 21], [-1, 0, -1, 0], [0.6, 0.9, 0.3, 0.05]),
              ([12, 13, 22], [-1, 0, 0], [0.7, 0.8, 0.1])]  # fmt: skip
    incremental = RunAheadTree()
    incremental.reset([1, 2])
    incremental.extend(2, *chunks[0])
    incremental.commit([1, 2, 10])
    incremental.extend(4, *chunks[1])
    incremental.commit([1, 2, 10, 11, 12])
    scratch = RunAheadTree()
    scratch.reset([1, 2])
    scratch.extend(2, *chunks[0])
    scratch.extend(4, *chunks[1])
    scratch.commit([1, 2, 10, 11, 12])
    assert incremental == scratch
    assert scratch.line == [1, 2, 10, 11, 12, 13] and scratch.alternatives == {5: [(22, 0.1)]}
