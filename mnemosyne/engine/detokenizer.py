"""Incremental detokenization and stop-string matching.

Decoding a growing id list one token at a time is not the same as decoding each
token alone (byte-level BPE splits UTF-8 characters, SentencePiece drops leading
spaces). We keep a small window of ids and emit the new suffix of its decoding:

    ids:    [ ... | prefix_offset ....... read_offset ....... len(ids) ]
                     already emitted text      not yet emitted
    delta = decode(ids[prefix_offset:]) minus decode(ids[prefix_offset:read_offset])

A delta ending in U+FFFD (incomplete UTF-8) is held back until the next token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

_PROMPT_CONTEXT_TOKENS = 5


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass
class IncrementalDetokenizer:
    tokenizer: Tokenizer
    skip_special_tokens: bool
    stop: list[str]
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""
    num_emitted: int = 0

    @classmethod
    def for_prompt(
        cls,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | np.ndarray,
        skip_special_tokens: bool,
        stop: list[str],
    ) -> IncrementalDetokenizer:
        ctx = [int(t) for t in prompt_ids[-_PROMPT_CONTEXT_TOKENS:]]  # plain ints, from a list or an array
        return cls(tokenizer, skip_special_tokens, stop, ctx, 0, len(ctx))

    def add_token(self, token_id: int, check_stop: bool = True) -> bool:
        """Append one token to `text`. Returns True when a stop string appeared (looked
        for only with `check_stop`; min_tokens turns it off); the text is then cut just before it."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False
        old_len = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if not self.stop or not check_stop:
            return False
        search_from = max(0, old_len - max(len(s) for s in self.stop) + 1)
        hits = [i for s in self.stop if (i := self.text.find(s, search_from)) != -1]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def take_delta(self, finished: bool) -> str:
        """Text not yet streamed. While running, the last len(longest stop) - 1
        characters are held back: they might be the start of a stop string."""
        hold = 0 if finished or not self.stop else max(len(s) for s in self.stop) - 1
        end = max(self.num_emitted, len(self.text) - hold)
        delta = self.text[self.num_emitted : end]
        self.num_emitted = end
        return delta
