"""Which KV slots each request owns, across KVP groups.

Layout of one request (see `pieces.py`), with T = max_tokens_per_kvp_group and
B = block_size::

    global tokens:  0 ........ T ........ 2T ..... token_end
    pieces:         [ group a )[ group b  )[ group c  )     a, b, c distinct
    blocks:         T/B blocks  T/B blocks  ceil((token_end - 2T) / B) blocks

Invariants (checked by `check_integrity`, `integrity.py`), besides those of `pieces.py`:
    * pieces[0].token_start == 0, pieces[i].token_end == pieces[i+1].token_start;
    * every piece is non-empty and len(block_ids) == blocks_needed(num_tokens);
    * a request uses each group at most once;
    * with T set (a multiple of B): every piece but the newest holds exactly T
      tokens and the newest at most T, so piece k covers [k*T, (k+1)*T) -- group
      boundaries sit at multiples of T, which is what `num_tokens_to_group_end` relies on;
    * each block's ref count equals the number of pieces that list it; a block listed
      by more than one piece caches content (only prefix-cache hits are shared).

Reserved slots only grow until `free`; a request never shrinks in place.

Prefix caching (`enable_prefix_caching`): once a request has computed a full block,
`cache_blocks` registers it in its group's pool under the block's chained content
hash (`block_hash.py`). A new request asks `find_cached_prefix` for the longest run
of its full blocks already cached and passes the `PrefixHit` to `allocate_slots`,
which references those blocks (ref count + 1) instead of allocating, so the request
computes only from `hit.num_tokens` on. Placement follows the cache::

    cached request A:  [ group 1: 0 .. T ) [ group 0: T .. 2T ) [ group 2: 2T .. 2T+5B )
    new request R:     [ group 1: hit    ) [ group 0: hit     ) [ group 2: hit 3 blocks | new ...
                         piece k of R goes to the group holding block k*T/B of the chain,
                         else (no hit) to the group with the most free blocks, as without caching

Piece boundaries sit at multiples of T for every request, so the hash of block
k*T/B (which names the whole prefix) is found exactly on the group that holds piece
k of an earlier request with that prefix. At most (num_tokens - 1) tokens are taken
from the cache: the last prompt token is always computed, for its logits. Cached
blocks are full and below the request's first computed position, so no worker ever
writes into them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mnemosyne.config import CacheConfig
from mnemosyne.errors import ConfigError
from mnemosyne.kv_cache.block_hash import BlockHash, BlockHasher
from mnemosyne.kv_cache.block_pool import BlockPool, KVCacheIntegrityError
from mnemosyne.kv_cache.integrity import check_pieces
from mnemosyne.kv_cache.pieces import KVPiece
from mnemosyne.kv_cache.prefix_hit import PrefixHit, longest_cached_prefix


@dataclass
class PrefixCacheStats:
    """Cumulative prefix-cache lookups of admitted requests, in tokens."""

    num_query_tokens: int = 0
    num_hit_tokens: int = 0


class KVCacheManager:
    def __init__(self, cache_config: CacheConfig) -> None:
        b = cache_config.block_size
        if b <= 0:
            raise ConfigError(f"block_size must be positive, got {b}")
        if not cache_config.num_blocks_per_group or min(cache_config.num_blocks_per_group) <= 0:
            raise ConfigError(
                f"every KVP group needs at least one block, got {cache_config.num_blocks_per_group}"
            )
        t = cache_config.max_tokens_per_kvp_group
        if t is not None and (t <= 0 or t % b):
            raise ConfigError(
                f"max_tokens_per_kvp_group ({t}) must be a positive multiple of block_size ({b})"
            )
        self.cache_config = cache_config
        self.block_size = b
        self.max_tokens_per_kvp_group = t
        self._pools = [BlockPool(n) for n in cache_config.num_blocks_per_group]
        self._pieces: dict[str, list[KVPiece]] = {}
        self.enable_prefix_caching = cache_config.enable_prefix_caching
        self.hasher = BlockHasher(b, cache_config.prefix_cache_salt)
        self.prefix_cache_stats = PrefixCacheStats()
        self._num_hashed: dict[str, int] = {}  # request id -> leading blocks offered to the cache

    # ---- geometry -------------------------------------------------------------------------------

    @property
    def num_kvp_groups(self) -> int:
        return len(self._pools)

    @property
    def capacity_tokens(self) -> int:
        """Token slots over all groups."""
        return sum(p.num_blocks for p in self._pools) * self.block_size

    @property
    def capacity_tokens_per_request(self) -> int:
        """The most tokens one request can ever hold (in an otherwise empty cache).

        T unbounded: a request stays on one group, so the largest group's capacity.
        T set: a request fills T tokens per group before onboarding the next; on an
        empty cache it visits groups largest first, so the sum of T over groups with
        at least T slots, plus the capacity of the first smaller group (where it then
        gets stuck).
        """
        caps = sorted((p.num_blocks * self.block_size for p in self._pools), reverse=True)
        t = self.max_tokens_per_kvp_group
        if t is None:
            return caps[0]
        total = 0
        for cap in caps:
            if cap < t:
                return total + cap
            total += t
        return total

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation -----------------------------------------------------------------------------

    def allocate_slots(
        self, request_id: str, num_tokens: int, hit: PrefixHit | None = None, num_known_tokens: int = 0
    ) -> bool:
        """Reserve slots for global tokens [0, num_tokens) of the request; all or nothing.

        `hit` (a request holding nothing yet): first take over the cached blocks of
        `find_cached_prefix` as its leading pieces. Then grows the newest piece up to T
        tokens, then onboards new pieces, each on the group with the most free blocks
        that the request does not use yet (ties: the lowest group index). Returns
        False, changing nothing, when some block cannot be had or no unused group is left.
        `num_known_tokens`: the tokens the request has (its prompt, plus the outputs it
        recomputes after a preemption); a piece that will hold more of them than num_tokens
        keeps the run after it for the next chunks (placement only, `block_pool.py`).
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if hit is None or not hit.num_tokens:
            pieces = self._pieces.get(request_id, [])
            if num_tokens <= (pieces[-1].token_end if pieces else 0):
                return True  # the slots are already held (most decode steps)
        free = [p.num_free_blocks for p in self._pools]
        if hit is not None and hit.num_tokens:
            if request_id in self._pieces:
                raise ValueError(f"request {request_id!r} already holds KV; a prefix hit needs a new one")
            if num_tokens <= hit.num_tokens:
                raise ValueError(
                    f"a prefix hit of {hit.num_tokens} tokens leaves none of {num_tokens} to compute"
                )
            pieces = self._hit_pieces(hit)
            for p in pieces:  # referencing an unreferenced cached block takes it off the free count
                free[p.group] -= sum(self._pools[p.group].ref_count(b) == 0 for b in p.block_ids)
        t = self.max_tokens_per_kvp_group
        used_groups = {p.group for p in pieces}

        # Plan without touching anything.
        grow_end, grow_blocks, pos = 0, 0, 0
        if pieces:
            newest = pieces[-1]
            grow_end = num_tokens if t is None else min(num_tokens, newest.token_start + t)
            pos = max(grow_end, newest.token_end)
            if grow_end > newest.token_end:
                grow_blocks = self.blocks_needed(grow_end - newest.token_start) - len(newest.block_ids)
                if grow_blocks > free[newest.group]:
                    return False
                free[newest.group] -= grow_blocks
        new_pieces: list[tuple[int, int, int]] = []  # (group, token_start, token_end)
        while pos < num_tokens:
            candidates = [g for g in range(self.num_kvp_groups) if g not in used_groups]
            if not candidates:
                return False
            g = max(candidates, key=lambda g: (free[g], -g))
            end = num_tokens if t is None else min(num_tokens, pos + t)
            n = self.blocks_needed(end - pos)
            if n > free[g]:
                return False
            free[g] -= n
            used_groups.add(g)
            new_pieces.append((g, pos, end))
            pos = end

        # Commit: every allocation below is known to succeed. Hit blocks are referenced
        # first, so that no allocation evicts them.
        if hit is not None and hit.num_tokens:
            for p in pieces:
                self._pools[p.group].touch(p.block_ids)
            self._num_hashed[request_id] = hit.num_blocks
            self.prefix_cache_stats.num_hit_tokens += hit.num_tokens
        if hit is not None:
            self.prefix_cache_stats.num_query_tokens += hit.num_query_tokens
        if pieces and grow_end > pieces[-1].token_end:
            newest = pieces[-1]
            # In place where the blocks after its last are free. Also with grow_blocks == 0
            # (a step inside its last block): the pool keeps the run after it claimed for
            # the piece only while it has blocks ahead, not for a decode (`block_pool.py`).
            ahead = self._blocks_ahead(newest.token_start, grow_end, num_known_tokens)
            grown = self._pools[newest.group].allocate(
                grow_blocks, after=newest.block_ids[-1], num_blocks_ahead=ahead
            )
            newest.block_ids.extend(grown)
            newest.token_end = grow_end
        for g, start, end in new_pieces:
            ahead = self._blocks_ahead(start, end, num_known_tokens)
            blocks = self._pools[g].allocate(self.blocks_needed(end - start), num_blocks_ahead=ahead)
            pieces.append(KVPiece(group=g, token_start=start, token_end=end, block_ids=blocks))
        self._pieces[request_id] = pieces
        return True

    def _blocks_ahead(self, token_start: int, token_end: int, num_known_tokens: int) -> int:
        """Blocks a piece holding [token_start, token_end) is known to take later: up to the
        request's known tokens, within the piece's T tokens."""
        t = self.max_tokens_per_kvp_group
        known_end = num_known_tokens if t is None else min(num_known_tokens, token_start + t)
        return max(
            0, self.blocks_needed(known_end - token_start) - self.blocks_needed(token_end - token_start)
        )

    def num_tokens_to_group_end(self, request_id: str, start: int) -> int | None:
        """How many tokens from global position `start` fit before the next group boundary.

        None when pieces are unbounded. Always >= 1: at a boundary it measures the
        next piece (which `allocate_slots` onboards). Boundaries sit at multiples of
        T for every request (see the module invariants), with or without pieces yet.
        """
        del request_id  # boundaries are request-independent while pieces are T-aligned
        t = self.max_tokens_per_kvp_group
        if t is None:
            return None
        return t - start % t

    def groups_to_grow(self, request_id: str) -> set[int]:
        """KVP groups where freed blocks would let the request grow: its newest piece's group
        while that piece is below T, else every group it does not use yet (onboarding)."""
        pieces = self._pieces.get(request_id, [])
        t = self.max_tokens_per_kvp_group
        if pieces and (t is None or pieces[-1].num_tokens < t):
            return {pieces[-1].group}
        return set(range(self.num_kvp_groups)) - {p.group for p in pieces}

    def groups_of(self, request_id: str) -> set[int]:
        return {p.group for p in self._pieces.get(request_id, [])}

    def free(self, request_id: str) -> None:
        """Release all of the request's blocks. Unknown ids are a no-op.

        Newest block first: cached blocks deeper in the prefix reach the evictable
        list before their parents, so they are evicted first (an evicted parent would
        leave its children unreachable anyway)."""
        self._num_hashed.pop(request_id, None)
        for piece in reversed(self._pieces.pop(request_id, [])):
            self._pools[piece.group].free(reversed(piece.block_ids))

    # ---- prefix cache ---------------------------------------------------------------------------

    def find_cached_prefix(self, block_hashes: Sequence[BlockHash], num_tokens: int) -> PrefixHit:
        """The cached blocks the request can take over now (`prefix_hit.py`); changes nothing.

        `block_hashes`: the hashes of its full blocks (`hasher.extend`); `num_tokens`: its
        length. An empty hit when caching is off."""
        if not self.enable_prefix_caching:
            return PrefixHit(num_query_tokens=num_tokens, block_size=self.block_size)
        return longest_cached_prefix(
            self._pools, self.block_size, self.max_tokens_per_kvp_group, block_hashes, num_tokens
        )

    def cache_blocks(
        self, request_id: str, block_hashes: Sequence[BlockHash], num_computed_tokens: int
    ) -> None:
        """Register the request's full blocks below `num_computed_tokens` (their K/V is written
        at every layer) under `block_hashes`. Blocks offered before are skipped; a no-op
        when prefix caching is off or the request holds no KV."""
        pieces = self._pieces.get(request_id)
        if not self.enable_prefix_caching or not pieces:
            return
        b = self.block_size
        done = self._num_hashed.get(request_id, 0)
        n = min(len(block_hashes), num_computed_tokens // b)
        if n <= done:
            return
        k = 0
        for i in range(done, n):
            pos = i * b
            while pieces[k].token_end <= pos:
                k += 1
            piece = pieces[k]
            self._pools[piece.group].cache_block(
                piece.block_ids[(pos - piece.token_start) // b], block_hashes[i]
            )
        self._num_hashed[request_id] = n

    def check_writable(self, request_id: str, start: int, end: int) -> None:
        """Raise unless the slots of [start, end) lie in the newest piece, in blocks that cache no
        content: K/V written there could change what another request reads."""
        pieces = self._pieces.get(request_id)
        newest = pieces[-1] if pieces else None
        if newest is None or not newest.token_start <= start < end <= newest.token_end:
            raise KVCacheIntegrityError(
                f"request {request_id!r}: [{start}, {end}) is not inside its newest piece"
            )
        lo = (start - newest.token_start) // self.block_size
        hi = (end - 1 - newest.token_start) // self.block_size
        pool = self._pools[newest.group]
        cached = [b for b in newest.block_ids[lo : hi + 1] if pool.block_hash(b) is not None]
        if cached:
            raise KVCacheIntegrityError(
                f"request {request_id!r}: writing [{start}, {end}) would overwrite cached blocks {cached[:4]}"
            )

    def _hit_pieces(self, hit: PrefixHit) -> list[KVPiece]:
        t = self.max_tokens_per_kvp_group
        pieces: list[KVPiece] = []
        pos = 0
        for k, (g, block_ids) in enumerate(hit.pieces):
            if t is not None and pos != k * t:
                raise ValueError(f"prefix hit piece {k} starts at {pos}, not at a {t}-token group boundary")
            end = pos + len(block_ids) * self.block_size
            pieces.append(KVPiece(group=g, token_start=pos, token_end=end, block_ids=list(block_ids)))
            pos = end
        return pieces

    # ---- queries --------------------------------------------------------------------------------

    def pieces(self, request_id: str) -> list[KVPiece]:
        """The request's pieces, oldest first (a new list; do not mutate the pieces)."""
        return list(self._pieces.get(request_id, []))

    def has_request(self, request_id: str) -> bool:
        return request_id in self._pieces

    def num_free_blocks(self, group: int = 0) -> int:
        return self._pools[group].num_free_blocks

    @property
    def num_free_blocks_total(self) -> int:
        """Free blocks summed over every KVP group."""
        return sum(self.num_free_blocks(g) for g in range(self.num_kvp_groups))

    def num_used_blocks(self, group: int = 0) -> int:
        return self._pools[group].num_used_blocks

    def usage(self) -> list[float]:
        """Fraction of blocks in use, per group (cached blocks nobody references count as free)."""
        return [p.num_used_blocks / p.num_blocks for p in self._pools]

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, over every group (referenced or not)."""
        return sum(p.num_cached_blocks for p in self._pools)

    def pool(self, group: int = 0) -> BlockPool:
        """Group `group`'s pool (read it; only the manager changes it)."""
        return self._pools[group]

    def check_integrity(self) -> None:
        """Raise `KVCacheIntegrityError` unless the pools and every request's pieces keep the
        invariants drawn above (`integrity.py`)."""
        check_pieces(self._pools, self._pieces, self.block_size, self.max_tokens_per_kvp_group)
        stale = self._num_hashed.keys() - self._pieces.keys()
        if stale:
            raise KVCacheIntegrityError(f"cache progress kept for requests without KV: {sorted(stale)[:4]}")
