"""The speculation methods, in one place (torch- and pydantic-free: the CLI imports it)."""

from __future__ import annotations

# run inside every verifier: `none` drafts nothing, `ngram` looks up the request's own context
IN_PROCESS_METHODS: tuple[str, ...] = ("none", "ngram")
# drafted by the drafter pool over gRPC
MODEL_METHODS: tuple[str, ...] = ("draft_model", "sorted")
SPEC_METHODS: tuple[str, ...] = (*IN_PROCESS_METHODS, *MODEL_METHODS)
