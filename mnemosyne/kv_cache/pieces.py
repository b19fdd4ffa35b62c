"""Where a request's KV lives: a list of contiguous token ranges, one per KVP group.

::

    request tokens:  0 ............................................ num_tokens
    pieces:          [ group 0: 0 .. T ) [ group 1: T .. 2T ) [ group 2: 2T .. n )
                                                                 ^ newest piece: the only one written

    piece.block_ids[j] holds tokens [token_start + j*B, token_start + (j+1)*B) of the
    request (B = block_size); only the newest piece may end mid-block.
    Global token t of the piece sits in slot
        block_ids[(t - token_start) // B] * B + (t - token_start) % B
    of its group's cache: `slot_of`, the one place this formula is written (the driver's
    `KVPiece` and the worker's `MirroredPiece` both use it; `slots_of` applies it to a
    range of tokens a block at a time).

With one KVP group (the default), a request has exactly one piece starting at 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def slot_of(block_ids: Sequence[int], token_start: int, pos: int, block_size: int) -> int:
    """The cache slot of global token `pos` in a piece that starts at `token_start` and holds
    `block_ids` (the layout drawn above)."""
    off = pos - token_start
    return block_ids[off // block_size] * block_size + off % block_size


def slots_of(block_ids: Sequence[int], token_start: int, start: int, end: int, block_size: int) -> list[int]:
    """`slot_of` of every token in [start, end), built one block's run of slots at a time (a
    step's 8K-token chunk: 128 ranges instead of 8K calls)."""
    slots: list[int] = []
    pos = start
    while pos < end:
        first = slot_of(block_ids, token_start, pos, block_size)
        n = min(block_size - (pos - token_start) % block_size, end - pos)  # to the block's end
        slots.extend(range(first, first + n))
        pos += n
    return slots


@dataclass
class KVPiece:
    group: int  # KVP group that owns this range
    token_start: int  # first global token position held here
    token_end: int  # one past the last token position with a reserved slot
    block_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    def slot(self, pos: int, block_size: int) -> int:
        return slot_of(self.block_ids, self.token_start, pos, block_size)
