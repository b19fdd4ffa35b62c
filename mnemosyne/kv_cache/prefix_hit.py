"""The cached blocks a new request can take over (prefix caching across KVP groups).

::

    request's full blocks:  h0 h1 h2 h3 | h4 h5 h6 h7 | h8 h9 ...       T = 4 blocks of B tokens
    piece 0 looked up on every group:   group 1 caches h0..h3  -> whole piece: go on
    piece 1 on the groups left:         group 0 caches h4..h5  -> partial: the chain ends
    hit = ((1, [ids of h0..h3]), (0, [ids of h4, h5])),  num_tokens = 6 B

Piece boundaries sit at multiples of T for every request, so piece k of an earlier request
with the same prefix is found on the group that holds it. A hit never covers the last token
of the request (its logits are needed): at most floor((num_tokens - 1) / B) blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mnemosyne.kv_cache.block_hash import BlockHash
from mnemosyne.kv_cache.block_pool import BlockPool


@dataclass(frozen=True)
class PrefixHit:
    """A lookup's result, passed to `KVCacheManager.allocate_slots`.

    ::

        pieces[k] = (group, block ids):  tokens [k*T, k*T + len(ids)*B)   every piece but
                                                                          the last holds T tokens
        num_tokens = B * (total blocks):  the request computes from here on
    """

    num_query_tokens: int  # the request's length when it asked
    block_size: int
    pieces: tuple[tuple[int, tuple[int, ...]], ...] = ()
    num_free_blocks: int = 0  # hit blocks nobody references now (counted as free until taken)

    @property
    def num_blocks(self) -> int:
        return sum(len(ids) for _, ids in self.pieces)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def longest_cached_prefix(
    pools: Sequence[BlockPool],
    block_size: int,
    max_tokens_per_kvp_group: int | None,
    block_hashes: Sequence[BlockHash],
    num_tokens: int,
) -> PrefixHit:
    """The longest run of the request's leading full blocks cached now; changes nothing.

    Piece k is looked up on every group the request does not use yet; the group with the
    longest run wins (ties: the lowest index), and the next piece only after a whole one.
    """
    b, t = block_size, max_tokens_per_kvp_group
    max_blocks = min(len(block_hashes), max(num_tokens - 1, 0) // b)
    per_piece = max_blocks if t is None else t // b
    pieces: list[tuple[int, tuple[int, ...]]] = []
    num_free = 0
    start = 0
    while start < max_blocks:
        end = min(max_blocks, start + per_piece)
        best: tuple[int, list[int]] = (-1, [])
        for g in range(len(pools)):
            if any(g == pg for pg, _ in pieces):
                continue
            run: list[int] = []
            for i in range(start, end):
                block = pools[g].lookup(block_hashes[i])
                if block is None:
                    break
                run.append(block)
            if len(run) > len(best[1]):
                best = (g, run)
        g, run = best
        if not run:
            break
        pieces.append((g, tuple(run)))
        num_free += sum(pools[g].ref_count(x) == 0 for x in run)
        start += len(run)
        if start < end:
            break  # the piece is not whole: the chain ends here
    return PrefixHit(
        num_query_tokens=num_tokens,
        block_size=b,
        pieces=tuple(pieces),
        num_free_blocks=num_free,
    )
