"""Incremental detokenization: token ids in, newly completed text out.

vLLM's prefix_offset / read_offset technique: decode only a short window of recent tokens
twice, `tokens[prefix_offset:read_offset]` (text already emitted) and
`tokens[prefix_offset:]` (the same plus the new tokens), and emit the difference. The
window starts a few prompt tokens back, so the first generated token gets the spacing it
has as a continuation of the prompt (a leading space stays a space).

A byte-level BPE splits multi-byte characters across tokens ("é" is two tokens here, "😀"
three); a window whose text ends in U+FFFD is an incomplete UTF-8 sequence, so it is held
back until a later token completes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Prompt tokens decoded before the first generated one (vLLM's
# INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
_INITIAL_OFFSET = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text of one generation, produced as tokens arrive."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Only the window's start matters from the prompt: keep just its tail.
        tail = [int(t) for t in prompt_ids[-_INITIAL_OFFSET:]]
        self._token_ids: list[int] = tail
        self._prefix_offset = 0  # window start: tokens before it never need decoding again
        self._read_offset = len(tail)  # tokens before it are emitted (or are prompt)
        self._text = ""

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated tokens; return the text they complete (may be "")."""
        if not token_ids:
            return ""
        self._token_ids.extend(token_ids)
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._token_ids[self._prefix_offset :])
        # NOTE: a trailing U+FFFD is an incomplete multi-byte character: wait for more bytes.
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        # Drop what falls out of the window so the token list stays short.
        del self._token_ids[: self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
        self._text += delta
        return delta

    def flush(self) -> str:
        """At the end of generation: text still held back (an unfinished character, as U+FFFD)."""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._token_ids[self._prefix_offset :])
        delta = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
        self._prefix_offset = self._read_offset = len(self._token_ids)
        self._text += delta
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
