"""The sorted exit policy: a D-UCB bandit over threshold vectors, driven by synthetic
acceptance streams (per-vector acceptance and drafting cost, like test_policy.py)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest

from shared.sampling import SamplingParams
from shared.types import GenerationRequest
from verifier_service.exit_policy import (
    NEVER_EXIT,
    ExitSetup,
    SortedExitPolicy,
    default_setup,
    fixed_exit_vector,
    load_exit_setup,
    setup_from_calibration,
    threshold_params,
)
from verifier_service.policy import ParamsPolicy

EXITS = [1, 2, 3]
STEP_S = 0.008  # one plain target step
VERIFY_SLOPE = 0.08


@dataclass
class World:
    """What drafting with one threshold vector really does (unknown to the policy)."""

    acceptance: float  # per draft token, given the earlier ones were accepted
    draft_s: float  # seconds per draft token
    exit_mix: tuple[float, ...]  # share of tokens leaving at exits 1, 2, 3


def best_rate(world: World, max_k: int = 10) -> float:
    """Analytic tokens/s at the best k for a world arm."""
    best = 1 / STEP_S
    for k in range(1, max_k + 1):
        tokens = sum(world.acceptance**j for j in range(k + 1))
        best = max(best, tokens / (STEP_S * (1 + VERIFY_SLOPE * k) + world.draft_s * k))
    return best


def simulate(policy, worlds: dict[tuple, World], rounds: int, seed: int = 0, cost_scale: float = 1.0):
    """Drive the policy; returns (arm key per speculative round, tokens, seconds)."""
    rng = random.Random(seed)
    chosen, tokens, seconds = [], 0, 0.0
    for _ in range(rounds):
        params = policy.params()
        key = tuple(sorted(params.items()))
        world = worlds[key]
        k = policy.next_k()
        if k == 0:
            policy.update(0, 0, 0.0, STEP_S)
            tokens, seconds = tokens + 1, seconds + STEP_S
            continue
        num_accepted = 0
        while num_accepted < k and rng.random() < world.acceptance:
            num_accepted += 1
        exit_layers = rng.choices(EXITS, weights=world.exit_mix, k=k)
        draft_s = world.draft_s * cost_scale * k
        verify_s = STEP_S * (1 + VERIFY_SLOPE * k)
        policy.update(k, num_accepted, draft_s, verify_s, exit_layers)
        chosen.append(key)
        tokens += num_accepted + 1
        seconds += draft_s + verify_s
    return chosen, tokens, seconds


def params_key(thresholds: dict[int, float]) -> tuple:
    return tuple(sorted(threshold_params(thresholds).items()))


CALIBRATED = {1: 0.4, 2: 0.2}


def worlds_for(exit_accept: tuple[float, float, float], calibrated: float) -> dict[tuple, World]:
    """Fixed exits cost 0.5 / 0.9 / 1.3 ms per token; the calibrated vector mixes them."""
    worlds = {
        params_key(fixed_exit_vector(EXITS, e)): World(a, cost, tuple(float(x == e) for x in EXITS))
        for e, a, cost in zip(EXITS, exit_accept, (0.0005, 0.0009, 0.0013))
    }
    worlds[params_key(CALIBRATED)] = World(calibrated, 0.0008, (0.5, 0.3, 0.2))
    return worlds


def setup_without_calibration() -> ExitSetup:
    return default_setup(EXITS, CALIBRATED)


# ============================================================== arms and setup


def test_fixed_exit_vectors_use_never_exit_above_and_zero_at_the_exit():
    assert fixed_exit_vector(EXITS, 1) == {1: 0.0, 2: NEVER_EXIT}
    assert fixed_exit_vector(EXITS, 2) == {1: NEVER_EXIT, 2: 0.0}
    assert fixed_exit_vector(EXITS, 3) == {1: NEVER_EXIT, 2: NEVER_EXIT}
    assert threshold_params({2: 0.5, 1: 0.25}) == {"threshold.1": 0.25, "threshold.2": 0.5}


def test_default_setup_starts_from_the_drafter_defaults_then_fixed_exits():
    setup = default_setup(EXITS, {1: 0.3})  # exit 2 has no default: never
    assert [a.name for a in setup.arms] == ["default", "exit1", "exit2", "exit3"]
    assert setup.start_params == {"threshold.1": 0.3, "threshold.2": NEVER_EXIT}
    # a default equal to a fixed exit is not listed twice
    assert len(default_setup(EXITS, {}).arms) == 3


def test_load_exit_setup_reads_calibration_per_target(tmp_path):
    (tmp_path / "sorted.json").write_text(json.dumps({"exits": EXITS, "thresholds": {"1": 0.3}}))
    assert load_exit_setup(tmp_path, "m").source == "drafter defaults"
    entry = {
        "num_speculative_tokens": 6,
        "arms": [
            {"name": "calibrated", "thresholds": {"1": 0.5, "2": 0.25},
             "acceptance": [0.7, 0.8], "draft_cost_ratio": 0.1},
            {"name": "exit3", "thresholds": {"1": 2.0, "2": 2.0}, "acceptance": [0.8]},
        ],
    }  # fmt: skip
    (tmp_path / "calibration.json").write_text(json.dumps({"m": entry, "s": {"arms": "bad"}}))
    setup = load_exit_setup(tmp_path, "m")
    assert setup.initial_k == 6
    assert setup.start_params == {"threshold.1": 0.5, "threshold.2": 0.25}
    assert [a.name for a in setup.arms] == ["calibrated", "exit3", "exit1", "exit2"]
    assert setup.arms[0].acceptance == (0.7, 0.8)
    # a corrupt entry falls back to the defaults; an unknown target too
    assert load_exit_setup(tmp_path, "s").arms[0].name == "default"
    assert load_exit_setup(tmp_path, "other").arms[0].name == "default"
    # no sorted.json here: no exit policy
    assert load_exit_setup(tmp_path / "missing", "m") is None
    with pytest.raises(ValueError):
        setup_from_calibration(EXITS, {"arms": [{"name": "x", "thresholds": {"1": 0.5}}]})


# ============================================================== learning from acceptance


@pytest.mark.parametrize(
    "exit_accept,calibrated,expected",
    [
        # deeper exits much better (like a large target): fixed exit 3 pays for its layers
        ((0.45, 0.62, 0.85), 0.70, fixed_exit_vector(EXITS, 3)),
        # the calibrated mix is best
        ((0.55, 0.70, 0.78), 0.80, CALIBRATED),
        # exits about equal (like an easy target): the cheapest exit, by a few % only
        ((0.78, 0.79, 0.80), 0.79, None),
    ],
)
def test_converges_to_the_fastest_vector(exit_accept, calibrated, expected):
    worlds = worlds_for(exit_accept, calibrated)
    best = max(best_rate(w) for w in worlds.values())
    policy = SortedExitPolicy(setup_without_calibration(), initial_k=5, max_k=10)
    chosen, tokens, seconds = simulate(policy, worlds, 1500)
    if expected is not None:
        late = chosen[-500:]
        assert late.count(params_key(expected)) > 0.8 * len(late)
    # from scratch (warm-up, exploration, k adaptation included) within a few % of the
    # analytic tokens/s of the best vector at its best k; then closer once learned
    assert tokens / seconds > 0.87 * best
    _, tokens, seconds = simulate(policy, worlds, 1500, seed=1)
    assert tokens / seconds > 0.91 * best


def test_follows_a_change_in_drafting_cost():
    # drafting 4x dearer (a loaded machine): cheap vectors now beat the deep exit
    # (speedups at their best k: exit 1 1.20, calibrated 1.16, exit 2 1.11, exit 3 1.07)
    worlds = worlds_for((0.60, 0.70, 0.85), 0.72)
    deep, cheap = params_key(fixed_exit_vector(EXITS, 3)), params_key(fixed_exit_vector(EXITS, 1))
    policy = SortedExitPolicy(setup_without_calibration(), initial_k=5, max_k=10)
    chosen, _, _ = simulate(policy, worlds, 1500)
    assert chosen[-300:].count(deep) > 240
    chosen, _, _ = simulate(policy, worlds, 3000, seed=2, cost_scale=4.0)
    late = chosen[-500:]
    assert late.count(deep) < 100
    assert late.count(cheap) + late.count(params_key(CALIBRATED)) > 350


def test_per_exit_acceptance_counts_judged_tokens_only():
    policy = SortedExitPolicy(setup_without_calibration(), initial_k=4, max_k=10)
    policy.update(0, 0, 0.0, STEP_S)
    # 4 drafted, 1 accepted: tokens at positions 0 (accepted) and 1 (rejected) were judged
    policy.update(4, 1, 0.002, 0.009, [1, 2, 3, 3])
    assert policy.exit_acceptance() == {1: 1.0, 2: 0.0}
    policy.update(4, 4, 0.002, 0.009, [3, 3, 3, 3])
    assert policy.exit_acceptance()[3] == 1.0
    summary = policy.summary()
    assert {"k", "threshold.1", "threshold.2", "acceptance.exit1", "acceptance.exit3"} <= set(summary)


def test_calibrated_priors_start_on_the_calibrated_vector_without_probing_blindly():
    entry = {
        "num_speculative_tokens": 4,
        "arms": [
            {"name": "calibrated", "thresholds": {"1": 0.4, "2": 0.2},
             "acceptance": [0.8] * 10, "draft_cost_ratio": 0.1},
            {"name": "exit1", "thresholds": {"1": 0.0, "2": 2.0},
             "acceptance": [0.55] * 10, "draft_cost_ratio": 0.06},
            {"name": "exit2", "thresholds": {"1": 2.0, "2": 0.0},
             "acceptance": [0.70] * 10, "draft_cost_ratio": 0.11},
            {"name": "exit3", "thresholds": {"1": 2.0, "2": 2.0},
             "acceptance": [0.78] * 10, "draft_cost_ratio": 0.16},
        ],
    }  # fmt: skip
    setup = setup_from_calibration(EXITS, entry)
    policy = SortedExitPolicy(setup, initial_k=setup.initial_k, max_k=10)
    assert policy.params() == {"threshold.1": 0.4, "threshold.2": 0.2}
    assert policy.next_k() == 0  # v0 first
    worlds = worlds_for((0.55, 0.70, 0.78), 0.80)
    chosen, _, _ = simulate(policy, worlds, 200)
    # informed priors: the calibrated vector runs most rounds from the start
    assert chosen.count(params_key(CALIBRATED)) > 0.8 * len(chosen)


def test_fork_keeps_what_was_learned():
    worlds = worlds_for((0.45, 0.62, 0.85), 0.70)
    policy = SortedExitPolicy(setup_without_calibration(), initial_k=5, max_k=10)
    simulate(policy, worlds, 1500)
    child = policy.fork()
    assert child.params() == policy.params() == threshold_params(fixed_exit_vector(EXITS, 3))
    assert child.kpolicy.k == policy.kpolicy.k and not child.kpolicy.warming_up
    assert child.arms[0].draft is not policy.arms[0].draft  # a copy, not shared state


# ============================================================== in the loop


class _Loop:
    """SpecDecodeLoop's policy choice without a model (make_policy only reads these)."""

    def __init__(self, setup):
        from shared.config import SpeculationConfig
        from verifier_service.loop import SpecDecodeLoop

        self.loop = SpecDecodeLoop.__new__(SpecDecodeLoop)
        self.loop.speculation = SpeculationConfig()
        self.loop.exit_setup = setup
        self.loop._learned = {}


def test_loop_picks_the_exit_policy_for_sorted_only():
    loop = _Loop(setup_without_calibration()).loop
    greedy = GenerationRequest(prompt_ids=[1], method="sorted")
    assert isinstance(loop.make_policy(greedy), SortedExitPolicy)
    other = loop.make_policy(GenerationRequest(prompt_ids=[1], method="draft_model"))
    assert not isinstance(other, SortedExitPolicy) and other.params() == {}


def test_seeded_sampled_and_fixed_k_requests_keep_the_starting_thresholds():
    setup = setup_without_calibration()
    loop = _Loop(setup).loop
    seeded = GenerationRequest(prompt_ids=[1], method="sorted",
                               sampling=SamplingParams(temperature=0.8, seed=3))  # fmt: skip
    for request in (seeded, GenerationRequest(prompt_ids=[1], method="sorted", num_speculative_tokens=3)):
        policy = loop.make_policy(request)
        assert isinstance(policy, ParamsPolicy)
        assert policy.params() == setup.start_params
        for _ in range(50):  # no timing or acceptance moves the thresholds
            k = policy.next_k()
            policy.update(k, 0, 0.5 * k, 0.001, [1] * k)
        assert policy.params() == setup.start_params
        assert policy.summary()["threshold.1"] == setup.start_params["threshold.1"]


def test_pinned_drafter_params_adapt_k_only_and_learn_apart():
    loop = _Loop(setup_without_calibration()).loop
    request = GenerationRequest(prompt_ids=[1], method="sorted", drafter_params={"fixed_exit": 1.0})
    policy, key = loop._make_policy(request)
    assert isinstance(policy, ParamsPolicy) and policy.params() == {"fixed_exit": 1.0}
    assert key == ("sorted", (("fixed_exit", 1.0),))


# ============================================================== calibrated: the shared-level model


def _sigmoid(x: float) -> float:
    import math

    return 1 / (1 + math.exp(-x))


def _logit(p: float) -> float:
    import math

    return math.log(p / (1 - p))


def calibrated_setup(acceptance: dict[tuple, float], draft_s: dict[tuple, float],
                     first: tuple | None = None) -> ExitSetup:  # fmt: skip
    """Calibration that measured each vector's acceptance and cost (cost over STEP_S);
    `first`: the starting vector (default: the first)."""
    arms = []
    order = sorted(acceptance, key=lambda key: key != first) if first else list(acceptance)
    for i, key in enumerate(order):
        alpha = acceptance[key]
        thresholds = {int(k.split(".")[1]): v for k, v in key}
        arms.append({"name": f"arm{i}", "thresholds": {str(e): t for e, t in thresholds.items()},
                     "acceptance": [alpha] * 10, "draft_cost_ratio": draft_s[key] / STEP_S})  # fmt: skip
    return setup_from_calibration(EXITS, {"num_speculative_tokens": 5, "arms": arms})


def simulate_shifting(policy, worlds, rounds, shift_of_round, seed=0, cost_scale=1.0):
    """Like `simulate`, with every arm's acceptance moved by a shared logit shift (the text)."""
    shifted = {}
    rng_state = random.Random(seed)
    chosen, tokens, seconds = [], 0, 0.0
    for r in range(rounds):
        shift = shift_of_round(r)
        for key, w in worlds.items():
            shifted[key] = World(_sigmoid(_logit(w.acceptance) + shift), w.draft_s, w.exit_mix)
        c, t, s = simulate(policy, shifted, 1, seed=rng_state.randrange(1 << 30), cost_scale=cost_scale)
        chosen += c
        tokens += t
        seconds += s
    return chosen, tokens, seconds


def _oracle_rate(worlds, shift, cost_scale=1.0) -> float:
    return max(best_rate(World(_sigmoid(_logit(w.acceptance) + shift), w.draft_s * cost_scale, w.exit_mix))
               for w in worlds.values())  # fmt: skip


def test_calibrated_model_is_not_fooled_by_text_difficulty():
    # the text alternates between hard and easy stretches: every arm's acceptance moves
    # together, so the arm measured on easy text must not look better than the others
    worlds = worlds_for((0.55, 0.70, 0.78), 0.80)  # the calibrated mix is best throughout
    setup = calibrated_setup({k: w.acceptance for k, w in worlds.items()},
                             {k: w.draft_s for k, w in worlds.items()})  # fmt: skip
    policy = SortedExitPolicy(setup, initial_k=5, max_k=10)

    def shift(r):
        return -1.0 if (r // 60) % 2 == 0 else 1.0

    chosen, tokens, seconds = simulate_shifting(policy, worlds, 2400, shift)
    share = chosen.count(params_key(CALIBRATED)) / len(chosen)
    assert share > 0.8, share
    oracle = sum(_oracle_rate(worlds, shift(r)) for r in range(2400)) / 2400
    assert tokens / seconds > 0.9 * oracle


def test_calibrated_model_follows_load_with_little_exploration():
    worlds = worlds_for((0.60, 0.70, 0.85), 0.72)
    setup = calibrated_setup({k: w.acceptance for k, w in worlds.items()},
                             {k: w.draft_s for k, w in worlds.items()})  # fmt: skip
    deep, cheap = params_key(fixed_exit_vector(EXITS, 3)), params_key(fixed_exit_vector(EXITS, 1))
    policy = SortedExitPolicy(setup, initial_k=5, max_k=10)
    assert policy.model_based
    chosen, _, _ = simulate(policy, worlds, 800)
    # only probe blocks (MIN_STAY rounds every PROBE_EVERY, at most one more block if a
    # probe looked better by chance) run other vectors
    off = 2 * SortedExitPolicy.MIN_STAY / SortedExitPolicy.PROBE_EVERY
    assert chosen[-400:].count(deep) >= 400 * (1 - off)
    chosen, _, _ = simulate(policy, worlds, 800, seed=3, cost_scale=4.0)
    late = chosen[-400:]
    # cheap vectors now (exit 1 1.20, calibrated mix 1.16: which one moves with the text)
    assert late.count(cheap) + late.count(params_key(CALIBRATED)) > 360 and late.count(deep) < 20
    assert policy.summary()["draft_cost_level"] > 1.0  # log 4 = 1.39: the load was learned


def test_calibrated_model_corrects_a_wrong_calibration_slowly():
    # calibration overrated the deep exit (0.85; really 0.62 here): its own rounds lower it
    worlds = worlds_for((0.60, 0.70, 0.62), 0.72)
    believed = {k: w.acceptance for k, w in worlds.items()}
    believed[params_key(fixed_exit_vector(EXITS, 3))] = 0.85
    deep = params_key(fixed_exit_vector(EXITS, 3))
    setup = calibrated_setup(believed, {k: w.draft_s for k, w in worlds.items()}, first=deep)
    policy = SortedExitPolicy(setup, initial_k=5, max_k=10)
    assert policy.params() == threshold_params(fixed_exit_vector(EXITS, 3))
    chosen, _, _ = simulate(policy, worlds, 3000)
    assert chosen[-500:].count(deep) < 100
