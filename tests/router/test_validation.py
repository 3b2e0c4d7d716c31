"""router/validation.py: every bad-input rule names its field; good requests resolve defaults."""

from __future__ import annotations

import pytest

from router.validation import ModelSpec, validate_request
from shared.config import RequestLimits
from shared.errors import InvalidArgumentError, NotFoundError
from shared.pb.specdec.v1 import common_pb2, router_pb2, verifier_pb2
from shared.validation import check_options

MODELS = {
    "tgt": ModelSpec(
        name="tgt", max_context=32, max_new_tokens=16, vocab_size=100,
        methods=("none", "ngram", "draft_model"), max_speculative_tokens=8,
    ),
    "plain": ModelSpec(name="plain", max_context=32, max_new_tokens=16, vocab_size=100,
                       methods=("none", "ngram")),
}  # fmt: skip
NAN = float("nan")


def _tokenize(model: str, text: str) -> list[int]:
    # One token per character (ids 1..99), enough to exercise length rules.
    return [1 + ord(c) % 99 for c in text]


def _request(**kw) -> router_pb2.GenerateRequest:
    sampling = kw.pop("sampling", {})
    ids = kw.pop("ids", None)
    kw.setdefault("model", "tgt")
    kw.setdefault("max_new_tokens", 8)
    if ids is not None:
        kw["token_ids"] = router_pb2.TokenIds(token_ids=ids)
    elif "text" not in kw and not kw.pop("no_prompt", False):
        kw["text"] = "abc"
    return router_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(**sampling), **kw)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, error, field",
    [
        (dict(model="nope"), NotFoundError, "model"),
        (dict(model=""), InvalidArgumentError, "model"),
        (dict(no_prompt=True), InvalidArgumentError, "prompt"),
        (dict(text=""), InvalidArgumentError, "prompt"),
        (dict(ids=[]), InvalidArgumentError, "prompt"),
        (dict(ids=[1, -1]), InvalidArgumentError, "prompt"),  # negative id
        (dict(ids=[1, 100]), InvalidArgumentError, "prompt"),  # id == vocab size
        (dict(text="x" * 32), InvalidArgumentError, "prompt"),  # prompt fills the context
        (dict(text="x" * 40), InvalidArgumentError, "prompt"),  # prompt beyond the context
        (dict(max_new_tokens=0), InvalidArgumentError, "max_new_tokens"),
        (dict(max_new_tokens=-3), InvalidArgumentError, "max_new_tokens"),
        (dict(max_new_tokens=17), InvalidArgumentError, "max_new_tokens"),  # above the limit
        (dict(text="x" * 20, max_new_tokens=13), InvalidArgumentError, "max_new_tokens"),  # 33 > 32
        (dict(sampling=dict(temperature=-0.1)), InvalidArgumentError, "temperature"),
        (dict(sampling=dict(temperature=NAN)), InvalidArgumentError, "temperature"),
        (dict(sampling=dict(temperature=float("inf"))), InvalidArgumentError, "temperature"),
        (dict(sampling=dict(top_p=-0.5)), InvalidArgumentError, "top_p"),
        (dict(sampling=dict(top_p=1.5)), InvalidArgumentError, "top_p"),
        (dict(sampling=dict(top_p=NAN)), InvalidArgumentError, "top_p"),
        (dict(sampling=dict(top_k=-1)), InvalidArgumentError, "top_k"),
        (dict(method="beam"), InvalidArgumentError, "method"),  # not a method at all
        (dict(model="plain", method="draft_model"), InvalidArgumentError, "method"),  # not offered
        (dict(num_speculative_tokens=-1), InvalidArgumentError, "num_speculative_tokens"),
        (dict(num_speculative_tokens=9), InvalidArgumentError, "num_speculative_tokens"),
        (dict(stop=["ok", ""]), InvalidArgumentError, "stop"),
    ],
)
def test_bad_input_raises_naming_the_field(kwargs, error, field):
    with pytest.raises(error) as info:
        validate_request(_request(**kwargs), MODELS, _tokenize)
    assert type(info.value) is error
    assert info.value.field == field
    assert info.value.message  # a human-readable reason


# ------------------------------------------------------------------ good input


@pytest.mark.parametrize(
    "kwargs, check",
    [
        # Unset top_p (proto default 0) means nucleus sampling off.
        (dict(), lambda v: v.sampling.top_p == 1.0 and v.sampling.greedy),
        (dict(sampling=dict(top_p=1.0, temperature=0.7, top_k=5, seed=3)),
         lambda v: (v.sampling.top_p, v.sampling.temperature, v.sampling.top_k, v.sampling.seed)
         == (1.0, pytest.approx(0.7), 5, 3)),
        (dict(sampling=dict(seed=0)), lambda v: v.sampling.seed == 0),  # seed 0 is a seed
        (dict(), lambda v: v.sampling.seed is None),
        (dict(), lambda v: v.method == "draft_model"),  # default method: best offered
        (dict(model="plain"), lambda v: v.method == "ngram"),
        (dict(method="none"), lambda v: v.method == "none"),
        (dict(ids=[0, 99, 5]), lambda v: v.prompt_ids == [0, 99, 5]),
        (dict(text="x" * 16, max_new_tokens=16), lambda v: v.max_new_tokens == 16),  # exactly fills
        (dict(text="x" * 31, max_new_tokens=1), lambda v: len(v.prompt_ids) == 31),
        (dict(num_speculative_tokens=0), lambda v: v.num_speculative_tokens == 0),
        (dict(), lambda v: v.num_speculative_tokens is None),
        (dict(request_id="abc"), lambda v: v.request_id == "abc"),
        (dict(), lambda v: len(v.request_id) == 32),  # the router makes one
        (dict(stop=["\n\n"]), lambda v: v.stop == ["\n\n"]),
    ],
)
def test_good_input_resolves_defaults(kwargs, check):
    assert check(validate_request(_request(**kwargs), MODELS, _tokenize))


def test_to_verifier_round_trips_fields():
    v = validate_request(
        _request(sampling=dict(temperature=0.5, seed=7), num_speculative_tokens=3, stop=["x"]),
        MODELS,
        _tokenize,
    )
    msg = v.to_verifier()
    assert list(msg.prompt_token_ids) == v.prompt_ids
    assert msg.model == "tgt" and msg.method == "draft_model" and msg.max_new_tokens == 8
    assert msg.sampling.seed == 7 and msg.sampling.HasField("seed")
    assert msg.num_speculative_tokens == 3 and list(msg.stop) == ["x"]
    # No seed / no k: the optional fields stay unset.
    msg = validate_request(_request(), MODELS, _tokenize).to_verifier()
    assert not msg.sampling.HasField("seed") and not msg.HasField("num_speculative_tokens")


# ------------------------------------------------------------------ shared with the verifier


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(method="beam"), "method"),
        (dict(sampling=common_pb2.SamplingParams(temperature=NAN)), "temperature"),
        (dict(sampling=common_pb2.SamplingParams(top_p=1.5)), "top_p"),
        (dict(num_speculative_tokens=9), "num_speculative_tokens"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_router_and_verifier_messages_fail_the_same_shared_rule(kwargs, field):
    """`check_options` reads both request messages by their common field names."""
    method = kwargs.pop("method", "ngram")
    for msg in (router_pb2.GenerateRequest(**kwargs), verifier_pb2.VerifierGenerateRequest(**kwargs)):
        with pytest.raises(InvalidArgumentError) as info:
            check_options(msg, method, max_k=8, limits=RequestLimits())
        assert info.value.field == field


def test_shared_rules_return_the_checked_options():
    msg = verifier_pb2.VerifierGenerateRequest(
        sampling=common_pb2.SamplingParams(temperature=0.5, seed=7), num_speculative_tokens=0, stop=["x"]
    )
    options = check_options(msg, "sorted", max_k=8, limits=RequestLimits())
    assert (options.method, options.num_speculative_tokens, options.stop) == ("sorted", 0, ["x"])
    assert options.sampling.seed == 7 and options.sampling.top_p == 1.0
