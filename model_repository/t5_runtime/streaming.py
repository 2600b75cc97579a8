"""Token-by-token text for streaming: deltas that concatenate to the final answer.

A token decoded alone loses its leading space (SentencePiece's "▁"), so each delta is the new part of
the decoded text of all tokens so far; a delta that would end inside a multi-byte character (U+FFFD
from byte fallback) waits for the next token.
"""

from __future__ import annotations

from collections.abc import Callable

_INCOMPLETE = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self.text = ""

    def advance(self, tokens: list[int], final: bool = False) -> tuple[list[int], str]:
        """`tokens`: every generated token decided so far (the previous ones plus new ones) -> the new
        token ids and the new text."""
        new_ids = tokens[len(self.ids) :]
        self.ids = list(tokens)
        text = self._decode(self.ids)
        if not final and text.endswith(_INCOMPLETE):
            return new_ids, ""
        new_text = text[len(self.text) :]
        self.text = text
        return new_ids, new_text
