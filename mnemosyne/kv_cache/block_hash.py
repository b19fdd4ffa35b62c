"""Content hashes of full KV blocks, the keys of the prefix cache.

::

    tokens:   [ block 0: 0 .. B ) [ block 1: B .. 2B ) [ block 2 ... ) [ partial: not hashed ]
    hash(0) = H(root  || ids of block 0)        root = H(tag || salt)
    hash(i) = H(hash(i-1) || ids of block i)

A block's hash names its token ids and, through its parent, every token before it
from position 0, under one salt (the model directory, dtype and weights format:
KV computed by another model never matches). Equal hashes mean an equal prefix, so
equal K/V (up to SHA-256 collisions). Only full blocks are hashed: a partly filled
block is still being written and is never shared.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

import numpy as np

BlockHash = bytes  # 32-byte SHA-256 digest

_TAG = b"mnemosyne-prefix-cache-v1\0"


class BlockHasher:
    def __init__(self, block_size: int, salt: str) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.root: BlockHash = hashlib.sha256(_TAG + salt.encode()).digest()

    def hash_block(self, parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
        """The hash of one full block given its parent's hash (None for block 0)."""
        if len(token_ids) != self.block_size:
            raise ValueError(f"a block holds {self.block_size} tokens, got {len(token_ids)}")
        return hashlib.sha256(
            (self.root if parent is None else parent) + array("q", token_ids).tobytes()
        ).digest()

    def extend(
        self,
        hashes: list[BlockHash],
        prompt: Sequence[int] | np.ndarray,
        outputs: Sequence[int] = (),
        max_blocks: int | None = None,
    ) -> None:
        """Append to `hashes` the hashes of the full blocks of `prompt + outputs` it lacks,
        up to `max_blocks` hashes in all (None: every full block).

        `hashes` must hold the hashes of the first len(hashes) blocks of the same
        sequence (it only grows: prompts never change, outputs are only appended).
        The concatenation is never built, so a decode step costs O(1) until a block fills.
        """
        b, p = self.block_size, len(prompt)
        first, end = len(hashes), (p + len(outputs)) // b
        if max_blocks is not None:
            end = min(end, max_blocks)
        if end <= first:
            return
        lo, hi = first * b, end * b
        # int64 ids of the new blocks (hashes never leave this process); a prompt array's
        # slice is converted whole, never id by id
        raw = (
            np.asarray(prompt[lo:hi], dtype=np.int64).tobytes()
            + array("q", outputs[max(lo - p, 0) : max(hi - p, 0)]).tobytes()
        )
        step = 8 * b
        parent = hashes[-1] if hashes else self.root
        for j in range(end - first):
            parent = hashlib.sha256(parent + raw[j * step : (j + 1) * step]).digest()
            hashes.append(parent)
