"""The speculation methods, in one place (torch- and pydantic-free: the CLI imports it)."""

from __future__ import annotations

from typing import Literal, get_args

# run inside every verifier: `none` drafts nothing, `ngram` looks up the request's own context
IN_PROCESS_METHODS: tuple[str, ...] = ("none", "ngram")
# a pool drafter's model kind, each also the method that drafts with it round by round; a
# Literal so that config validation names them too
DrafterKind = Literal["draft_model", "sorted"]
DRAFTER_KINDS: tuple[str, ...] = get_args(DrafterKind)
# drafted ahead of the verifier by any pool drafter, streamed without being asked per round
RUN_AHEAD_METHODS: tuple[str, ...] = ("card",)
# drafted by the drafter pool over gRPC
MODEL_METHODS: tuple[str, ...] = (*DRAFTER_KINDS, *RUN_AHEAD_METHODS)
SPEC_METHODS: tuple[str, ...] = (*IN_PROCESS_METHODS, *MODEL_METHODS)
