"""router/http.py: OpenAI completion bodies map onto the public gRPC request (pure)."""

from __future__ import annotations

import pytest

from router.http import CompletionRequest, to_generate_request
from shared.errors import InvalidArgumentError


def _map(**body):
    body.setdefault("model", "m")
    body.setdefault("prompt", "def f(x):")
    return to_generate_request(CompletionRequest(**body), "rid")


def test_openai_defaults():
    req = _map()
    assert req.WhichOneof("prompt") == "text" and req.text == "def f(x):"
    assert req.max_new_tokens == 16  # OpenAI's default max_tokens
    assert req.sampling.temperature == 1.0 and req.sampling.top_p == 1.0  # OpenAI's defaults
    assert not req.sampling.HasField("seed") and not req.HasField("num_speculative_tokens")
    assert req.method == "" and req.request_id == "rid"


@pytest.mark.parametrize(
    "body, check",
    [
        (dict(prompt=[1, 2, 3]), lambda r: list(r.token_ids.token_ids) == [1, 2, 3]),
        (dict(prompt=[]), lambda r: r.WhichOneof("prompt") == "token_ids"),  # empty: validation names it
        (dict(prompt=["one"]), lambda r: r.text == "one"),  # a batch of one
        (dict(prompt=[[4, 5]]), lambda r: list(r.token_ids.token_ids) == [4, 5]),
        (dict(prompt=""), lambda r: r.WhichOneof("prompt") == "text"),
        (dict(max_tokens=64, temperature=0), lambda r: (r.max_new_tokens, r.sampling.temperature) == (64, 0)),
        (dict(top_k=-1), lambda r: r.sampling.top_k == 0),  # vLLM's "off"
        (dict(top_k=5), lambda r: r.sampling.top_k == 5),
        (dict(seed=0), lambda r: r.sampling.HasField("seed") and r.sampling.seed == 0),
        (dict(stop="\n\n"), lambda r: list(r.stop) == ["\n\n"]),
        (dict(stop=["a", "b"]), lambda r: list(r.stop) == ["a", "b"]),
        (dict(method="ngram", num_speculative_tokens=0),
         lambda r: r.method == "ngram" and r.HasField("num_speculative_tokens")),
    ],
)  # fmt: skip
def test_body_maps_to_request(body, check):
    assert check(_map(**body))


@pytest.mark.parametrize(
    "body, param",
    [
        (dict(n=2), "n"),
        (dict(best_of=3), "best_of"),
        (dict(echo=True), "echo"),
        (dict(logprobs=1), "logprobs"),
        (dict(prompt=["a", "b"]), "prompt"),  # batched prompts
        (dict(prompt=[1, 2**31]), "prompt"),  # beyond int32
        (dict(top_p=0), "top_p"),  # an explicit 0 is out of (0, 1]
        (dict(max_tokens=2**40), "max_tokens"),
        (dict(seed=2**70), "seed"),
        (dict(method=""), "method"),
    ],
)
def test_unsupported_or_out_of_range_is_400_naming_the_param(body, param):
    with pytest.raises(InvalidArgumentError) as info:
        _map(**body)
    assert info.value.field == param and info.value.http_status == 400
