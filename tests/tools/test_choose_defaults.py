"""The rule that turns a choose-defaults run into a default (no models: the scores are given)."""

from tools.choose_defaults import M, pick, simplicity


def test_simplicity_classes():
    assert [simplicity(c) for c in (M(2), M(7, fixed_exit=2), M(5, "plus2minus1"), M(5, fixed_exit=-1))] == [0, 0, 1, 2]


def test_the_best_of_the_simplest_class_within_tolerance_wins():
    candidates = [M(2), M(3), M(5, "plus2minus1"), M(5, fixed_exit=-1)]
    # k = 2 and k = 3 are equally simple: the better one wins even where both are within tolerance
    assert pick(candidates, [0.965, 0.985, 1.0, 0.9], tolerance=0.02) == 1
    # no fixed k within tolerance: the rule
    assert pick(candidates, [0.90, 0.95, 1.0, 0.9], tolerance=0.02) == 2
    # the confidence exits only when nothing simpler is close
    assert pick(candidates, [0.90, 0.95, 0.96, 1.0], tolerance=0.02) == 3
