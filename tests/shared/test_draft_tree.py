"""Draft trees (`shared.draft_tree`) on tiny hand-built trees: the accepted path, card's
run-ahead tree (expand, prune to an accepted context, look up a child, best-first
selection within a budget) and a tree grown across commits equal to one grown from
scratch."""

from __future__ import annotations

import pytest

from shared.draft_tree import Commit, RunAheadTree, accept_path, depths_of, is_chain


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
    assert not tree.extend(3, [12], [-1], [0.5])  # a branch under no alternative: ignored
    assert not tree.extend(5, [12], [-1], [0.5])  # past the line's end: ignored
    assert tree.commit([1, 2, 10]) is Commit.KEPT  # the bonus was the line's token: pruned
    assert tree.line == [1, 2, 10, 11] and tree.alternatives == {3: [(21, 0.05)]}
    assert tree.commit([1, 2, 10, 21]) is Commit.RESTARTED  # a correction without a branch
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


def test_branches_are_selected_and_taken():
    tree = _tree([1, 2])
    # drafted ahead under the alternative 20: 30 (q 0.8), then 31 (q 0.5)
    assert tree.extend(2, [20, 30, 31], [-1, 0, 1], [0.3, 0.8, 0.5])
    assert tree.branches == {(2, 20): [(30, 0.8), (31, 0.5)]}
    assert not tree.extend(2, [10, 30], [-1, 0], [0.6, 0.8])  # 10 is the line's, not an alternative
    assert not tree.extend(2, [20, 30, 31], [-1, 0, 0], [0.3, 0.8, 0.5])  # branches are chains
    # path probabilities: 10 0.6, 11 0.54, 20 0.3, 30 0.24, 31 0.12, 21 0.03
    four = tree.select(2, 4)
    assert (four.token_ids, four.parents) == ([10, 11, 20, 30], [-1, 0, -1, 2])
    assert tree.select(2, 6).token_ids == [10, 11, 20, 30, 21, 31]  # off the line: by depth
    assert tree.branch_taken([1, 2, 20, 30]) == (2, 20) and tree.branch_taken([1, 2, 20, 7]) is None
    assert tree.branch_taken([1, 2, 10]) is None  # the line's own
    assert tree.commit([1, 2, 20, 30]) is Commit.BRANCHED
    assert tree.line == [1, 2, 20, 30, 31] and tree.line_probs == {4: 0.5}
    assert not tree.alternatives and not tree.branches
    assert tree.select(4, 4).token_ids == [31]


def test_a_branch_whose_path_leaves_the_context_restarts():
    tree = _tree([1, 2])
    tree.extend(2, [20, 30], [-1, 0], [0.3, 0.8])
    assert tree.commit([1, 2, 20, 30, 40]) is Commit.RESTARTED  # past the branch's end
    assert tree.line == [1, 2, 20, 30, 40]


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


@pytest.mark.parametrize(
    "contexts",
    [
        [[1, 2, 10], [1, 2, 10, 21, 40]],  # kept, then the branch under 21
        [[1, 2, 10, 21], [1, 2, 10, 21, 40, 41]],  # the branch, then its line kept
        [[1, 2, 10, 21, 40, 9], [1, 2, 10, 21, 40, 9, 8]],  # off the branch: restarts
        [[1, 2], [1, 2, 20, 30]],  # nothing accepted, then the branch under 20
    ],
)
def test_commits_in_turn_equal_the_last_alone_with_branches(contexts):
    """The lazy-commit lemma that lets the verifier apply its commits late holds for trees
    with branches: no commit drops a path that extends a later (longer) context."""
    def grown():
        tree = _tree([1, 2])
        tree.extend(2, [20, 30], [-1, 0], [0.3, 0.8])
        tree.extend(3, [21, 40, 41], [-1, 0, 1], [0.05, 0.9, 0.9])
        return tree

    in_turn, alone = grown(), grown()
    for context in contexts:
        in_turn.commit(context)
    alone.commit(contexts[-1])
    assert in_turn == alone
