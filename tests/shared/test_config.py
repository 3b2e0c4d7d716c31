"""Config validation that names what is wrong before anything starts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.config import MethodSpeculation, SpecdecConfig, default_config


def with_method(method: str, **spec) -> dict:
    data = default_config().model_dump()
    data["speculation"]["methods"][method] = spec
    return data


def test_a_method_may_pick_its_pool_drafter():
    config = SpecdecConfig.model_validate(with_method("card", num_speculative_tokens=4, drafter="codelm-draft"))
    assert config.speculation.methods["card"].drafter == "codelm-draft"


@pytest.mark.parametrize(("method", "drafter", "message"), [
    ("card", "nope", "is not a configured drafter"),
    ("sorted", "codelm-draft", "serves 'draft_model', not 'sorted'"),
])  # fmt: skip
def test_a_drafter_that_cannot_serve_the_method_is_a_config_error(method, drafter, message):
    with pytest.raises(ValidationError, match=message):
        SpecdecConfig.model_validate(with_method(method, num_speculative_tokens=3, drafter=drafter))


def test_greedy_settings_share_the_methods_drafter():
    with pytest.raises(ValidationError, match="when_greedy cannot pick a drafter"):
        MethodSpeculation(num_speculative_tokens=3, when_greedy=MethodSpeculation(num_speculative_tokens=5, drafter="x"))
