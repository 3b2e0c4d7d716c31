"""Run-ahead drafting (`card`): which branches the drafter prepares, and the verifier's loop drafting
through a real drafter pool served over gRPC on 127.0.0.1 (the pool's event loop in a
background thread, the loop in this one): the mirror of the line equals drafting from
scratch, greedy output is the target's, sampled output has its distribution, and a slowed
drafter costs only speculation, within the wait budget."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from drafter_service.pool import DrafterPool
from shared.config import RunAheadConfig, default_config
from shared.loading import tokenizer_hash
from shared.draft_tree import RunAheadTree
from shared.run_ahead import ahead_limit, branches_to_draft
from shared.sampling import SamplingParams
from shared.types import GenerationRequest
from tests.exactness import compare_greedy, humaneval_prompts
from tests.grpc_servers import start_drafter_server
from tests.sampling_stats import assert_matches_joint, expected_joint
from verifier_service.draft_client import RemoteProposerFactory, RunAheadProposer
from verifier_service.engine import load_target
from verifier_service.loop import SpecDecodeLoop
from verifier_service.policy import RulePolicy

_DEFAULT = default_config()
# codelm-draft, growing the whole tree: 3 runner-ups per line token, branches under 4 of them
RUN_AHEAD = RunAheadConfig(alternatives=3, branches=4, branch_length=2)
CONFIG = _DEFAULT.model_copy(update={"drafters": [_DEFAULT.drafters[0].model_copy(update={"run_ahead": RUN_AHEAD})]})
# the rule k, never stepped aside by load arms: these tests are about the drafter
SPECULATION = CONFIG.speculation.model_copy(update={"load_aware": False})


# ---------------------------------------------------------------- what the drafter drafts


def test_branches_go_under_the_likeliest_alternatives_of_the_round_in_flight():
    tree = RunAheadTree()
    tree.reset([1, 2])
    # line 10 11 12 (q .5 .9 .9) after the context, alternatives 20 21 (depth 1), 22 (depth 3)
    tree.extend(2, [10, 11, 12, 20, 21, 22], [-1, 0, 1, -1, -1, 1], [0.5, 0.9, 0.9, 0.3, 0.1, 0.05])
    # path probabilities: 20 0.3, 21 0.1, 22 0.5 * 0.9 * 0.05 = 0.0225
    assert branches_to_draft(tree, 2, 4, 4) == [(2, 20), (2, 21), (4, 22)]
    assert branches_to_draft(tree, 2, 4, 2) == [(2, 20), (2, 21)]  # the likeliest
    assert branches_to_draft(tree, 2, 1, 4) == [(2, 20), (2, 21)]  # depth <= k + 1 only
    assert branches_to_draft(tree, 2, 0, 4) == [] and branches_to_draft(tree, 2, 4, 0) == []
    tree.extend(2, [20, 30], [-1, 0], [0.3, 0.8])
    assert branches_to_draft(tree, 2, 4, 4) == [(2, 21), (4, 22)]  # drafted once
    assert ahead_limit(4) == 8


# ---------------------------------------------------------------- with a real pool


class _ServerThread:
    """A drafter pool served by grpc.aio in its own event loop thread."""

    def __init__(self, pool: DrafterPool) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = self._call(start_drafter_server(pool))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        self._call(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class _Slowed:
    """A drafter factory whose batched drafting sleeps first (the test hook for a slow drafter)."""

    def __init__(self, factory, delay_s: float) -> None:
        self._factory, self.delay_s = factory, delay_s

    def __getattr__(self, name):
        return getattr(self._factory, name)

    def propose_batch(self, requests):
        time.sleep(self.delay_s)
        return self._factory.propose_batch(requests)


@pytest.fixture(scope="module")
def pool():
    pool = DrafterPool.load(CONFIG.drafters)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def server(pool):
    running = _ServerThread(pool)
    yield running.server
    running.stop()


@pytest.fixture(scope="module", params=[t.name for t in CONFIG.targets])
def target(request):
    engine, tokenizer = load_target(CONFIG.target(request.param), max_batch_rows=4)
    return request.param, SpecDecodeLoop(engine, tokenizer, RulePolicy(SPECULATION)), tokenizer


def card_factory(address: str, target: str, **kwargs) -> RemoteProposerFactory:
    return RemoteProposerFactory(address, target, tokenizer_hash(CONFIG.target(target).model_dir), "card", **kwargs)


@pytest.mark.slow
def test_the_mirrored_line_equals_drafting_from_scratch(server, pool, target):
    """Each round's cached draft is the drafter's own greedy continuation of the context
    with its runner-up tokens beside it and the branches drafted under them (a subtree of
    the tree drafted from scratch), through restarts (a correction), branches taken and
    kept lines (a bonus the line had)."""
    name, _, tokenizer = target
    prompt = tokenizer(humaneval_prompts(1)[0]).input_ids
    scratch = pool._drafters["codelm-draft"].factory
    proposer = card_factory(server.address, name, run_ahead_wait_s=2.0).new_session(prompt, SamplingParams())
    assert isinstance(proposer, RunAheadProposer)
    context, k = list(prompt), 4
    num_trees = 0
    try:
        for round_ in range(12):
            proposer.request(context, k)
            got = proposer.collect(time.monotonic())
            draft = got.line_ids()
            reference = _scratch(scratch, context, k)
            line = reference.line_ids()
            assert draft and draft == line[: len(draft)], f"round {round_}: {draft} != {reference}"
            # every branch node: what the drafter drafts from scratch after its alternative
            branches = set()
            for node, parent in zip(reference.token_ids[len(line) :], reference.tree_parents[len(line) :]):
                stem = [*line[: parent + 1], node]
                branch = _scratch(scratch, context + stem, RUN_AHEAD.branch_length).line_ids()
                branches |= {(*stem, *branch[:j]) for j in range(1, len(branch) + 1)}
            assert _paths(got) <= _paths(reference) | branches, round_
            num_trees += got.tree_parents is not None
            if round_ % 3 == 2:  # a correction: the target disagreed at the second token
                context += [draft[0], (draft[1] + 1) % 1000]
            elif round_ % 3 == 1:  # the target took the first token's runner-up
                time.sleep(0.2)  # the drafter has drafted the branch under it (and idles)
                context += [reference.token_ids[len(line) + reference.tree_parents[len(line) :].index(-1)]]
            else:  # everything accepted, and the bonus is the line's next token when it has one
                context += draft
                proposer.request(context, k)
                nxt = proposer.collect(time.monotonic()).line_ids()
                context += nxt[:1] or [7]
        assert proposer.num_line_kept > 0 and proposer.num_stale_dropped == 0
        assert num_trees > 0  # runner-ups were verified beside the line
        assert proposer.num_branch_commits > 0  # a commit took a branch drafted under a runner-up
    finally:
        proposer.close()


def _scratch(factory, context: list[int], k: int):
    """The drafter's tree for `context` drafted in a new session: k line tokens and their
    runner-ups."""
    with torch.inference_mode():
        session = factory.new_session(context, SamplingParams())
        session.num_alternatives = RUN_AHEAD.alternatives
        return session.propose(context, k)


def _paths(draft) -> set[tuple[int, ...]]:
    """Every node of a draft as its root-to-node token path."""
    parents = draft.tree_parents or list(range(-1, len(draft.token_ids) - 1))
    paths: list[tuple[int, ...]] = []
    for tok, p in zip(draft.token_ids, parents):
        paths.append((*(paths[p] if p >= 0 else ()), tok))
    return set(paths)


def generate(loop, factory, requests):
    sessions = [(r, factory.new_session(r.prompt_ids, r.sampling) if factory else None) for r in requests]
    results = loop.run_together(sessions)
    return results, [s for _, s in sessions]


@pytest.mark.slow
def test_greedy_card_equals_the_target_alone(server, target):
    name, loop, tokenizer = target
    factory = card_factory(server.address, name)
    prompts = [tokenizer(p).input_ids for p in humaneval_prompts(4)]  # one per slot
    max_new = 48
    drafter_s: list[float] = []  # what each step reports to the policy
    observe = loop.policy.observe
    loop.policy.observe = lambda rows, outcomes, step: (drafter_s.append(step.drafter_s), observe(rows, outcomes, step))
    try:
        results, sessions = generate(loop, factory, [GenerationRequest(prompt_ids=p, max_new_tokens=max_new, method="card") for p in prompts])
    finally:
        del loop.policy.observe
    assert sum(drafter_s) > 0  # the pool's CPU seconds reached the policy
    for i, (prompt, result) in enumerate(zip(prompts, results)):
        cmp = compare_greedy(name, prompt, result.token_ids, max_new)
        assert cmp.ok, f"{name} prompt {i} diverged at {cmp.position}"
    if name == "codelm-target-s":
        # NOTE: in this tight in-process loop target-s now steps faster than codelm-draft
        # runs ahead (one-row steps 1.5x cheaper since MKL over [in, out] weights): 0-1
        # cached rounds of 47 per request, 0-3 with fp32 drafters; through the service it
        # still drafts in 25 % of rounds at one stream (1.04x `none`). So the line's use is
        # asserted on target-m, whose steps leave the drafter time to run ahead
        return
    assert sum(r.stats.num_accepted_tokens for r in results) > 0  # the drafter's line was used
    assert sum(s.num_cached_rounds for s in sessions) > 0
    assert sum(s.num_alternative_commits for s in sessions) > 0  # a runner-up was the target's token


@pytest.mark.slow
def test_a_slowed_drafter_costs_speculation_only_within_the_wait_budget(pool, target):
    """The test hook: every drafting call of the pool sleeps 30 ms. Rounds never wait past
    the budget (recorded per round), some find nothing cached (fallbacks), output is exact."""
    name, loop, tokenizer = target
    drafter = pool._drafters["codelm-draft"]
    slowed = DrafterPool.from_factories({"slow": _Slowed(drafter.factory, 0.03)}, {"slow": drafter.tokenizer_hash})
    running = _ServerThread(slowed)
    budget = 0.005
    try:
        factory = card_factory(running.server.address, name, run_ahead_wait_s=budget)
        prompts = [tokenizer(p).input_ids for p in humaneval_prompts(2, offset=3)]
        results, sessions = generate(loop, factory, [GenerationRequest(prompt_ids=p, max_new_tokens=32, method="card") for p in prompts])
    finally:
        running.stop()
        slowed.shutdown()
    for prompt, result in zip(prompts, results):
        assert compare_greedy(name, prompt, result.token_ids, 32).ok
    # NOTE: a wait ends at the first queue timeout past the budget: allow the thread wake-up
    assert all(s.max_wait_s <= budget + 0.02 for s in sessions), [s.max_wait_s for s in sessions]
    assert sum(s.num_rounds - s.num_cached_rounds for s in sessions) > 0  # fallbacks happened


@pytest.mark.slow
def test_sampled_card_has_the_targets_distribution(server):
    """χ² over the first two generated tokens (the second from a card round or the
    target's own draw), as in test_sampling, for a request sharing its steps with another."""
    name = "codelm-target-s"
    engine, tokenizer = load_target(CONFIG.target(name), max_batch_rows=2)
    loop = SpecDecodeLoop(engine, tokenizer, RulePolicy(SPECULATION))
    factory = card_factory(server.address, name, run_ahead_wait_s=0.05)
    prompt, other = [tokenizer(p).input_ids for p in humaneval_prompts(2, offset=2)]
    params = {"temperature": 1.0, "top_k": 3}
    joint = expected_joint(name, prompt, SamplingParams(**params))
    counts: dict[tuple[int, int], int] = {}
    num_draft = 0
    num_samples = 1000
    for seed in range(num_samples):
        request = GenerationRequest(prompt_ids=prompt, max_new_tokens=4, method="card", num_speculative_tokens=2,
                                    sampling=SamplingParams(**params, seed=seed))  # fmt: skip
        company = GenerationRequest(prompt_ids=other, max_new_tokens=3, method="card")
        (result, _), _ = generate(loop, factory, [request, company])
        pair = tuple(result.token_ids[:2])
        counts[pair] = counts.get(pair, 0) + 1
        num_draft += result.stats.num_draft_tokens
    assert num_draft > 0, "no card round ran"
    assert_matches_joint(counts, joint, "card")
