"""The speculation methods, in one place (torch- and pydantic-free: the CLI imports it)."""

from __future__ import annotations

from typing import Literal, get_args

# run inside every verifier: `none` drafts nothing, `ngram` looks up the request's own context
IN_PROCESS_METHODS: tuple[str, ...] = ("none", "ngram")
# drafted by the drafter pool over gRPC; a Literal so that config validation names them too
ModelMethod = Literal["draft_model", "sorted"]
MODEL_METHODS: tuple[str, ...] = get_args(ModelMethod)
SPEC_METHODS: tuple[str, ...] = (*IN_PROCESS_METHODS, *MODEL_METHODS)
