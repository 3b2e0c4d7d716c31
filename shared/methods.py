"""The speculation methods, in one place (torch- and pydantic-free: the CLI imports it)."""

from __future__ import annotations

SPEC_METHODS: tuple[str, ...] = ("none", "ngram", "draft_model", "sorted")
# drafted by the drafter pool over gRPC; `ngram` runs inside the verifier, `none` drafts nothing
MODEL_METHODS: tuple[str, ...] = ("draft_model", "sorted")
