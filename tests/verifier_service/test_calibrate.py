"""verifier_service.calibrate: the exit rule, exact round simulation and the choice of
thresholds/k on tiny hand-built views (no models)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from verifier_service.calibrate import (
    Costs,
    Sequence_,
    best_vectors,
    chosen_exits,
    grid_vectors,
    rate,
    run_lengths,
    simulate,
    write_entry,
)
from verifier_service.exit_policy import NEVER_EXIT, setup_from_calibration


def seq(conf, match) -> Sequence_:
    conf, match = np.asarray(conf, dtype=float), np.asarray(match, dtype=bool)
    return Sequence_(prompt=[0], continuation=list(range(conf.shape[1])), conf=conf, match=match)


@pytest.mark.parametrize(
    "thresholds,expected",
    [
        ([0.0, 0.0], [0, 0, 0]),  # 0: always the shallowest
        ([NEVER_EXIT, NEVER_EXIT], [2, 2, 2]),  # never: the deepest emits
        ([0.5, 0.5], [0, 1, 2]),  # first exit whose confidence clears its threshold
        ([0.95, 0.65], [1, 1, 2]),
    ],
)
def test_chosen_exits_follow_the_sorted_rule(thresholds, expected):
    conf = np.array([[0.9, 0.4, 0.1], [0.9, 0.7, 0.3], [0.9, 0.9, 0.9]])
    assert chosen_exits(conf, thresholds).tolist() == expected


def test_run_lengths():
    assert run_lengths(np.array([1, 1, 0, 1, 1, 1, 0], dtype=bool)).tolist() == [2, 1, 0, 3, 2, 1, 0]


def test_simulated_rounds_are_exact_greedy_rounds():
    # one exit; c_0 from the prefill; drafts for c_1..c_7 match except c_3
    view = seq([[1.0] * 8], [[1, 1, 1, 0, 1, 1, 1, 1]])
    sim = simulate([view], [], k=2)
    # rounds: s=1 accepts c1,c2 (+c3 bonus); s=4 accepts c4,c5 (+c6); s=7 drafts only c7
    assert (sim.rounds, sim.tokens) == (3, 3 + 3 + 2)
    assert sim.tried == [3, 2] and sim.accepted == [3, 2]
    assert sim.drafted == 5
    sim = simulate([view], [], k=4)
    # s=1: c1,c2 accepted, c3 rejected (correction c3); s=4: c4..c7 all accepted
    assert (sim.rounds, sim.tokens, sim.drafted) == (2, 3 + 5, 4 + 4)
    assert sim.tried == [2, 2, 2, 1] and sim.accepted == [2, 2, 1, 1]


def test_drafted_tokens_are_counted_by_exit_including_redrafts():
    # exit 0 confident on even positions; a rejection makes later positions drafted twice
    view = seq([[0.9, 0.9, 0.1, 0.9, 0.1], [1.0] * 5], [[1, 1, 1, 0, 1], [1, 1, 0, 1, 1]])
    sim = simulate([view], [0.5], k=4)
    # s=1: positions 1..4 drafted (exits 0,1,0,1), matches 1,0 -> 1 accepted, s=3;
    # s=3: positions 3..4 drafted (exits 0,1), position 3 rejected; s=4: position 4 (exit 1)
    assert sim.rounds == 3 and sim.drafted_per_exit == [3.0, 4.0]
    assert sim.draft_s_per_token([1.0, 2.0]) == pytest.approx(11 / 7)


def test_rate_is_the_policy_cost_model():
    costs = Costs(v0_s=0.01, verify_ratio=[1 + 0.1 * k for k in range(11)])
    assert rate(2.0, 4, costs, 0.001) == pytest.approx(2.0 / (0.01 * 1.4 + 0.004))


def test_grid_lists_vectors_that_act_alike_once():
    vectors = grid_vectors(3)
    assert [0.0, NEVER_EXIT] in vectors and [0.0, 0.4] not in vectors
    assert len(vectors) == len({tuple(v) for v in vectors}) == 9 * 9 - 8


def _costs():
    return Costs(v0_s=0.008, verify_ratio=[1 + 0.08 * k for k in range(11)])


# per vector: drafting seconds per token (exit 1 cheap, deep exit dear, a mix in between)
_DRAFT_S = {(0.0, NEVER_EXIT): 0.0005, (NEVER_EXIT, 0.0): 0.0009,
            (NEVER_EXIT, NEVER_EXIT): 0.0013, (0.5, 0.5): 0.0011}  # fmt: skip


def test_picks_the_cheap_exit_when_exits_agree_and_the_deep_one_when_they_do_not():
    agree = [seq([[0.9] * 40, [0.9] * 40, [0.9] * 40], [[1] * 40] * 3)]
    picks = best_vectors(agree, _DRAFT_S, _costs(), {"x": 1.0}, max_k=10)
    assert picks["x"][0] == [0.0, NEVER_EXIT] and picks["x"][1] >= 8  # exit 1, long drafts
    rng = np.random.default_rng(0)
    shallow_wrong = (rng.random(40) < 0.3).astype(int)  # exits 1 and 2 match 30 %
    deep = [seq([[0.9] * 40, [0.9] * 40, [0.9] * 40], [shallow_wrong, shallow_wrong, [1] * 40])]
    picks = best_vectors(deep, _DRAFT_S, _costs(), {"x": 1.0, "dear": 50.0}, max_k=10)
    assert picks["x"][0] == [NEVER_EXIT, NEVER_EXIT]
    # drafting 50x dearer: short drafts from the cheap exit
    assert picks["dear"][0] == [0.0, NEVER_EXIT] and picks["dear"][1] <= 2


def test_calibration_entry_round_trips_into_the_exit_policy_setup(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"other": {"kept": True}}))
    entry = {
        "thresholds": {"1": 0.3, "2": 0.1},
        "num_speculative_tokens": 6,
        "verify_ratio": [1.0, 1.3, 1.35],
        "arms": [{"name": "calibrated", "thresholds": {"1": 0.3, "2": 0.1},
                  "acceptance": [0.8, 0.9], "draft_cost_ratio": 0.1}],
    }  # fmt: skip
    write_entry(path, "t", entry)
    data = json.loads(path.read_text())
    assert data["other"] == {"kept": True} and data["t"] == entry
    setup = setup_from_calibration([1, 2, 3], data["t"])
    assert setup.initial_k == 6 and setup.start_params == {"threshold.1": 0.3, "threshold.2": 0.1}
    # the measured verify costs seed the k policy (unmeasured k: the prior line, monotone)
    from verifier_service.exit_policy import SortedExitPolicy

    ratios = SortedExitPolicy(setup, 6, 4).kpolicy.verify_ratios()
    assert ratios[:3] == [1.0, 1.3, 1.35] and ratios[3] == ratios[4] == 1.35
