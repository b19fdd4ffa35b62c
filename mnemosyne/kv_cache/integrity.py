"""`KVCacheManager.check_integrity`'s piece checks: every request's pieces against the
invariants drawn in `manager.py` (and `pieces.py`), and every block's ref count against
the pieces that list it. Reads only; raises `KVCacheIntegrityError` naming the first break.

    per request:   pieces[0].token_start == 0, contiguous, non-empty, distinct known groups,
                   len(block_ids) == ceil(num_tokens / B);
                   with T set: every piece but the newest holds exactly T tokens, the newest <= T
    per block:     ref count == pieces listing it; listed by more than one -> caches content
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from mnemosyne.kv_cache.block_pool import BlockPool, KVCacheIntegrityError
from mnemosyne.kv_cache.pieces import KVPiece


def check_pieces(
    pools: Sequence[BlockPool],
    pieces_by_request: Mapping[str, list[KVPiece]],
    block_size: int,
    max_tokens_per_kvp_group: int | None,
) -> None:
    """Check each pool, each request's pieces (oldest first) and the ref counts they imply."""
    for pool in pools:
        pool.check_integrity()
    refs = [Counter[int]() for _ in pools]
    t = max_tokens_per_kvp_group
    for rid, pieces in pieces_by_request.items():
        if not pieces:
            raise KVCacheIntegrityError(f"request {rid!r} has an empty piece list")
        if pieces[0].token_start != 0:
            raise KVCacheIntegrityError(f"request {rid!r}: first piece starts at {pieces[0].token_start}, not 0")
        groups = [p.group for p in pieces]
        if len(set(groups)) != len(groups):
            raise KVCacheIntegrityError(f"request {rid!r} uses a group twice: {groups}")
        for i, p in enumerate(pieces):
            if not 0 <= p.group < len(pools):
                raise KVCacheIntegrityError(f"request {rid!r}: piece on unknown group {p.group}")
            if p.num_tokens <= 0:
                raise KVCacheIntegrityError(f"request {rid!r}: empty piece {p}")
            num_blocks_needed = -(-p.num_tokens // block_size)
            if len(p.block_ids) != num_blocks_needed:
                raise KVCacheIntegrityError(
                    f"request {rid!r}: piece [{p.token_start}, {p.token_end}) holds "
                    f"{len(p.block_ids)} blocks, needs {num_blocks_needed}"
                )
            is_newest = i == len(pieces) - 1
            if not is_newest and pieces[i + 1].token_start != p.token_end:
                raise KVCacheIntegrityError(
                    f"request {rid!r}: pieces not contiguous at {p.token_end} / {pieces[i + 1].token_start}"
                )
            if t is not None and (p.num_tokens > t or (not is_newest and p.num_tokens != t)):
                raise KVCacheIntegrityError(
                    f"request {rid!r}: piece [{p.token_start}, {p.token_end}) breaks the "
                    f"{t}-token group boundary"
                )
            refs[p.group].update(p.block_ids)
    for g, pool in enumerate(pools):
        for b in range(pool.num_blocks):
            if pool.ref_count(b) != refs[g][b]:
                raise KVCacheIntegrityError(
                    f"group {g} block {b}: ref count {pool.ref_count(b)} but {refs[g][b]} piece(s) reference it"
                )
            if refs[g][b] > 1 and pool.block_hash(b) is None:
                raise KVCacheIntegrityError(
                    f"group {g} block {b} is shared by {refs[g][b]} pieces but caches no content"
                )
