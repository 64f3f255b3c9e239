"""Turn a growing list of token ids into text pieces that are safe to print at once.

Decoding token by token is wrong for byte-level BPE (one Chinese character can
span several tokens) and for tokenizers that merge spaces with their
neighbours. So each step decodes a short window of recent tokens, compares it
with the same window without the newest ones, and emits only what was added --
holding back while the text ends in an incomplete character (U+FFFD).
"""

from __future__ import annotations

from typing import Any

INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids one at a time with ``add``; each call returns the new text (maybe "")."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # tokens before this were already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith(INCOMPLETE):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character, shown as U+FFFD)."""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before):]
