"""S2D nested drafter: exit logits, the exit rule, incremental == from scratch, batching.

Tiny random Llama configs (GQA, peaked logits) keep this file fast; one test loads the
committed demo drafter when it is present.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drafter_service.nested import check_tokenizer, propose_batch
from drafter_service.nested_model import (
    NEVER,
    NestedDrafter,
    choose_exit,
    exit_confidence,
    fixed_exit_thresholds,
    thresholds_list,
)
from drafter_service.sorted import SortedExitsConfig, SortedProposerFactory
from shared.config import DrafterConfig
from shared.loading import tokenizer_hash
from shared.paths import PROJECT_ROOT, models_dir
from shared.sampling import SamplingParams

EXITS = [1, 2, 4]
VOCAB = 61


def tiny_config(num_layers: int = 4) -> LlamaConfig:
    # initializer_range 0.3: peaked logits, so argmax gaps dwarf float noise (no greedy ties)
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=96,
        rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.3,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def tiny_model(num_layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(num_layers)).eval()


def truncated(model: LlamaForCausalLM, n: int) -> LlamaForCausalLM:
    """The HF model made of the first n layers + the shared norm and head."""
    sub = LlamaForCausalLM(tiny_config(n)).eval()
    missing, _ = sub.load_state_dict(model.state_dict(), strict=False)
    assert [m for m in missing if m != "lm_head.weight"] == []
    return sub


def write_fake_tokenizer(path, vocab_tag: str = "a") -> None:
    (path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {vocab_tag: 0}}}))


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model()


@pytest.fixture(scope="module")
def drafter(model) -> NestedDrafter:
    return NestedDrafter(model, EXITS)


@pytest.fixture(scope="module")
def factory(model, tmp_path_factory) -> SortedProposerFactory:
    path = tmp_path_factory.mktemp("tiny_sorted")
    model.save_pretrained(str(path))
    write_fake_tokenizer(path)
    SortedExitsConfig(exits=EXITS, thresholds={1: 0.5, 2: 0.4}, matmul_dtype="float32").save(path)
    return SortedProposerFactory(DrafterConfig(name="tiny-sorted", model_dir=path, kind="sorted"))


def context(n: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, VOCAB) for _ in range(n)]


# ============================================================== exit logits


def test_lean_forward_exit_logits_equal_truncated_model(model, drafter):
    # the incremental forward (prefill, then growing contexts with lazy fill) at every exit
    refs = {n: truncated(model, n) for n in EXITS}
    ctx = context(30)
    state = drafter.new_state(capacity=8)  # small: exercises buffer growth too
    keep = 0
    for m in (7, 8, 13, 14, 30, 22):  # the last one rolls back
        keep = min(keep, m - 1)
        drafter.reconcile(state, ctx[:m], keep)
        with torch.inference_mode():
            ours = drafter.exit_logits_last(state)
        for i, n in enumerate(EXITS):
            with torch.no_grad():
                ref = refs[n](input_ids=torch.tensor([ctx[:m]])).logits[0, -1]
            torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=1e-5)
        keep = m


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 3e-2), (torch.bfloat16, 0.3)])
def test_half_matmul_weights_stay_close(model, drafter, dtype, atol):
    # half-precision weights (fp16 is the serving default), fp32 activations: logits move
    # only slightly, and a many-row prefill (wide path) agrees with one-row steps
    half = NestedDrafter(model, EXITS, matmul_dtype=dtype)
    ctx = context(25)
    ref, wide, narrow = drafter.new_state(), half.new_state(), half.new_state()
    drafter.reconcile(ref, ctx, 0)
    half.reconcile(wide, ctx, 0)
    with torch.inference_mode():
        for m in range(1, len(ctx)):  # token by token: every matmul has one row
            half.reconcile(narrow, ctx[:m], m - 1)
            half.exit_logits_last(narrow)
        half.reconcile(narrow, ctx, len(ctx) - 1)
        for x, y, z in zip(
            drafter.exit_logits_last(ref), half.exit_logits_last(wide),
            half.exit_logits_last(narrow),
        ):
            torch.testing.assert_close(y, x, atol=atol, rtol=0.05)
            torch.testing.assert_close(z, y, atol=atol / 3, rtol=0.02)


# ============================================================== exit rule


@pytest.mark.parametrize(
    "confidences, thresholds, expected",
    [
        ([0.3, 0.5, 0.9], [0.0, 0.0, 0.0], 0),  # threshold 0: the shallowest always exits
        ([0.99, 0.99, 0.2], [1.5, 1.5, 0.0], 2),  # > 1: never; the deepest always emits
        ([0.99, 0.99, 0.2], [NEVER, NEVER, 0.0], 2),
        ([0.3, 0.5, 0.9], [0.4, 0.4, 0.0], 1),  # in between: the first that clears
        ([0.3, 0.5, 0.9], [0.3, 0.4, 0.0], 0),  # >= is inclusive
        ([0.3, 0.5, 0.9], [0.4, 0.6, 0.0], 2),
    ],
)
def test_choose_exit_table(confidences, thresholds, expected):
    assert choose_exit(confidences, thresholds) == expected


def test_exit_confidence_is_top_softmax_prob():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    for temperature, scale in [(0.0, 1.0), (1.0, 1.0), (0.5, 0.5)]:  # 0 = greedy: raw softmax
        expected = torch.softmax(logits / scale, -1).max(-1).values
        torch.testing.assert_close(exit_confidence(logits, temperature), expected)


def test_thresholds_list_and_fixed_exit():
    assert thresholds_list(EXITS, {1: 0.7}) == [0.7, NEVER, 0.0]
    assert thresholds_list(EXITS, {4: 0.9}) == [NEVER, NEVER, 0.0]  # deepest always emits
    assert thresholds_list(EXITS, fixed_exit_thresholds(EXITS, 2)) == [NEVER, 0.0, 0.0]
    with pytest.raises(ValueError, match="exit 3"):
        thresholds_list(EXITS, {3: 0.5})
    with pytest.raises(ValueError, match="fixed exit 3"):
        fixed_exit_thresholds(EXITS, 3)


def test_drafter_takes_the_documented_exit(factory):
    # thresholds set by hand around the measured confidences of the first draft token
    drafter = factory.drafter
    ctx = context(12)
    state = drafter.new_state()
    drafter.reconcile(state, ctx, 0)
    with torch.inference_mode():
        logits = drafter.exit_logits_last(state)
    conf = [float(exit_confidence(lg, 0.0)) for lg in logits]
    argmax = [int(lg.argmax()) for lg in logits]
    cases = [
        ({1: 0.0}, 0),  # 0 -> shallowest
        ({1: 1.5, 2: 1.5}, 2),  # > 1 -> deepest
        ({1: conf[0] + 1e-3, 2: conf[1] - 1e-3}, 1),  # exit 1 fails, exit 2 clears
        ({1: conf[0] - 1e-3}, 0),
        ({1: conf[0] + 1e-3, 2: conf[1] + 1e-3}, 2),
    ]
    for thresholds, expected in cases:
        session = factory.new_session(ctx, SamplingParams())
        session.set_thresholds(thresholds)
        draft = session.propose(ctx, 1)
        assert session.last_exit_layers == [EXITS[expected]], thresholds
        assert draft.token_ids == [argmax[expected]]
        assert draft.draft_probs is None
        assert draft.info["mean_exit_layer"] == EXITS[expected]


@pytest.mark.parametrize("exit_layer", EXITS)
def test_fixed_exit_drafts_only_at_that_exit(factory, exit_layer):
    session = factory.new_session([], SamplingParams())
    session.set_fixed_exit(exit_layer)
    session.propose(context(10), 6)
    assert session.last_exit_layers == [exit_layer] * 6


def test_set_params_keys_are_sticky_and_map_to_thresholds(factory):
    session = factory.new_session([], SamplingParams())
    default = list(factory.default_thresholds)  # exits 1, 2, 4: [0.5, 0.4, 0]
    session.set_params({"threshold.1": 0.9})  # exit 2 keeps its default
    assert session.thresholds == [0.9, default[1], 0.0]
    session.set_params({"threshold.2": 2.0})  # sticky: threshold.1 stays 0.9
    assert session.thresholds == [0.9, 2.0, 0.0]
    session.set_params({"fixed_exit": 2.0})  # pinned: exit 1 never, exit 2 always
    assert session.thresholds == [NEVER, 0.0, 0.0]
    draft = session.propose(context(10), 3)
    assert draft.exit_layers == session.last_exit_layers == [2, 2, 2]
    session.set_params({"fixed_exit": -1.0})  # unpinned: the sticky thresholds again
    assert session.thresholds == [0.9, 2.0, 0.0]
    for bad in ({"threshold.3": 0.5}, {"fixed_exit": 3.0}, {"temperature": 1.0}, {"threshold.x": 1}):
        with pytest.raises(ValueError):
            session.set_params(bad)
    assert session.thresholds == [0.9, 2.0, 0.0]  # a rejected call changes nothing
    session.reset_thresholds()
    assert session.thresholds == default and session.params == {}


# ============================================================== incremental == from scratch


def _rounds(factory, sampling, thresholds, seed, num_rounds=12, k=4):
    """Propose, accept a random prefix plus a different correction token, repeat; each
    round a fresh session (same seed) must propose exactly the same draft."""
    rng = random.Random(seed)
    ctx = context(9, seed=seed)
    session = factory.new_session(ctx, sampling)
    session.set_thresholds(thresholds)
    exits_seen = set()
    for _ in range(num_rounds):
        draft = session.propose(ctx, k)
        fresh = factory.new_session(ctx, sampling)
        fresh.set_thresholds(thresholds)
        ref = fresh.propose(ctx, k)
        assert draft.token_ids == ref.token_ids
        assert session.last_exit_layers == fresh.last_exit_layers
        assert draft.draft_probs is None and ref.draft_probs is None  # argmax, or seeded draws
        exits_seen.update(session.last_exit_layers)
        num_accepted = rng.randrange(0, len(draft) + 1)
        session.update(num_accepted)
        if num_accepted < len(draft):  # recovered token differs from the rejected draft
            rejected = draft.token_ids[num_accepted]
            correction = rng.choice([t for t in range(1, VOCAB) if t != rejected])
        else:  # bonus token
            correction = rng.randrange(1, VOCAB)
        ctx = ctx + draft.token_ids[:num_accepted] + [correction]
    return exits_seen


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=7)],
    ids=["greedy", "sampled"],
)
def test_incremental_equals_from_scratch(factory, sampling):
    # mid-range thresholds so tokens leave at different exits within one draft
    exits_seen = set()
    for seed in range(3):
        exits_seen |= _rounds(factory, sampling, {1: 0.3, 2: 0.25}, seed)
    assert len(exits_seen) >= 2, exits_seen


def test_batched_propose_equals_one_by_one(factory):
    specs = [
        (context(9, 1), 3, {1: 0.3, 2: 0.25}, SamplingParams()),
        (context(20, 2), 5, fixed_exit_thresholds(EXITS, 2), SamplingParams()),
        (context(4, 3), 2, {1: 0.0}, SamplingParams(temperature=1.0, seed=3)),
        (context(15, 4), 0, {}, SamplingParams()),  # k = 0: empty draft
    ]

    def sessions():
        out = []
        for ctx, k, thr, sp in specs:
            s = factory.new_session(ctx, sp)
            s.set_thresholds(thr)
            out.append((s, ctx, k))
        return out

    # two rounds, so the second batch reconciles caches of different lengths
    batched, single = sessions(), sessions()
    for _ in range(2):
        got = propose_batch(batched)
        want = [s.propose(ctx, k) for s, ctx, k in single]
        for (bs, _, _), (ss, _, _), g, w in zip(batched, single, got, want):
            assert g.token_ids == w.token_ids
            assert bs.last_exit_layers == ss.last_exit_layers
            assert (g.draft_probs is None) == (w.draft_probs is None)
            if g.draft_probs is not None:
                torch.testing.assert_close(g.draft_probs, w.draft_probs)
        batched = [(s, ctx + d.token_ids[:1] + [5], k) for (s, ctx, k), d in zip(batched, got)]
        single = [(s, ctx + d.token_ids[:1] + [5], k) for (s, ctx, k), d in zip(single, want)]


def test_propose_respects_max_positions(factory):
    session = factory.new_session([], SamplingParams())
    assert len(session.propose(context(93), 8)) == 3  # max_position_embeddings = 96
    assert len(session.propose(context(96), 8)) == 0


# ============================================================== training


def test_attach_target_checks_tokenizer_hash(factory, tmp_path):
    factory.attach_target("same", factory.tokenizer_hash)
    assert factory.targets == {"same": factory.tokenizer_hash}
    write_fake_tokenizer(tmp_path, vocab_tag="b")
    other = tokenizer_hash(tmp_path)
    assert other != factory.tokenizer_hash
    with pytest.raises(ValueError, match="tokenizers differ") as e:
        factory.attach_target("other", other)
    assert other in str(e.value) and factory.tokenizer_hash in str(e.value)
    with pytest.raises(ValueError, match="'d'.*'t'"):
        check_tokenizer("0" * 16, "1" * 16, "d", "t")


def test_sorted_json_tokenizer_mismatch_is_a_startup_error(model, tmp_path):
    model.save_pretrained(str(tmp_path))
    write_fake_tokenizer(tmp_path)
    SortedExitsConfig(exits=EXITS, tokenizer_hash="0" * 16).save(tmp_path)
    with pytest.raises(ValueError, match="tokenizer"):
        SortedProposerFactory(DrafterConfig(name="x", model_dir=tmp_path, kind="sorted"))


DEMO = PROJECT_ROOT / "models" / "codelm-sorted"


@pytest.mark.skipif(not (DEMO / "sorted.json").is_file(), reason="demo drafter not trained yet")
def test_demo_drafter_serves_both_demo_targets():
    config = DrafterConfig(name="codelm-sorted", model_dir=DEMO, kind="sorted")
    factory = SortedProposerFactory(config)
    for name in ("codelm-target-m", "codelm-target-s"):
        factory.attach_target(name, tokenizer_hash(models_dir() / name))
    assert sum(f.stat().st_size for f in DEMO.iterdir()) <= 10_000_000
    session = factory.new_session([], SamplingParams())
    draft = session.propose([1, 2, 3, 4, 5], 4)
    assert len(draft) == 4 and set(session.last_exit_layers) <= set(factory.exits)
