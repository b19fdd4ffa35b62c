"""A pool of fixed-size KV blocks for one KVP group: ref counts, placement and the prefix cache.

::

    block ids:    0   1   2   3   4   5   6   7          (num_blocks = 8)
    ref counts:   1   0   2   0   1   0   0   0
    hash:         h0  h1  h2  -   -   h5  -   -          full blocks registered by `cache_block`
    free list:    runs [3, 4), [6, 8)                    ref 0, no hash (`FreeRuns`)
    evictable:    OrderedDict([5, 1])                    ref 0, hashed: least recently freed first
    cached:       {h0: 0, h1: 1, h2: 2, h5: 5}           hash -> block (one block per hash)

Placement: a request's blocks should be one run of consecutive ids, because the chunk
prefill reads the leading run of a sequence's blocks in place and gathers the rest
(`AttentionMetadata.block_runs_cpu`: cuDNN's path, chunks of hundreds of queries after
thousands of keys, i.e. long prompts; decodes read any block table at the same cost). The free
list is kept as maximal runs of free ids (`free_runs.py`), and the pool remembers each piece's
tail (the last block of its newest allocation) with its claim: the blocks the piece is known
to take next (`num_blocks_ahead`, the manager's word that its request has known tokens left
to place: a prompt's later chunks, also when this step took one block or none), 0 once it
decodes. A claim reserves the first ids of the free run after the tail. Who goes where::

    ids:  0 ........................................................................ N-1
          [A][B][C][ L: a prompt in prefill --> |<- L's claim ->|  free  ...  |[x][B'][A']
          short prompts packed                                                   spills <-

    allocate(n, after=tail)   1. in place: tail+1, tail+2, ... while on the free list;
                              2. the rest: a 1-block step of a piece not growing on (a
                                 decode): a spill to the last id of the smallest run with an
                                 unclaimed id (of the 8 smallest), else the highest free id;
                                 else as a new piece (a prefill moves once, then grows in
                                 place again).
    allocate(n)  (new piece)  best fit, room = n + its blocks ahead: past the claim at the start
                              of the smallest run (of the 8 smallest that hold the room) whose
                              unclaimed part holds it, else of the largest such (of the 8
                              largest); for a piece growing on, the middle of the largest run
                              if claims leave no room anywhere and its upper half has it (each
                              grower keeps half); past the claim of the largest run whose
                              unclaimed part holds n; in the largest run: its middle (growing)
                              or its end; if no run holds n, the lowest free ids.

Best fit packs short requests into the smallest runs that hold them and keeps the large runs
whole for long prompts. Before it (a new piece took the start or, growing, the middle of the
largest run), 32 short prompts prefilled in chunks halved the pool into 32 runs of ~440 blocks,
and a 256K-token prompt arriving next (4096 blocks) took 7 runs, so its cuDNN chunks gathered
every prefix segment (benchmarks/results/README.md, "Thirty-first session").

So a prompt growing chunk by chunk keeps one run, also in chunks of one block or less
(late adaptive chunks of a long prompt): its claim keeps the others off the run after it.
Without `num_blocks_ahead`, each such chunk that found its successor taken spilled to the top,
and its growth upward met the spills coming down: in the simulated 8B serving trace
(benchmarks/results/README.md, "Eighth session") a 351K-token prompt held 1257 runs and a 493K
one (1B) 107; with it, one each. Decodes whose successor is taken fill holes or spill down from
the top. The claims steer placement only: they change no content and no invariant. Each call
adds at most one break after its in-place part (the rest is one run where one fits). Cost:
O(n + log R) per call (R free runs), never a scan of the pool.

Eviction is unchanged: never-hashed free blocks first, then the evictable list, least
recently freed first (the manager frees a request's newest block first, so a chain loses
its tail before its head). An in-place extension takes only never-hashed successors:
taking a cached successor would evict it out of LRU order. The blocks evicted by a call
are exactly those LRU order names; only their order in the returned list is ascending
(a freed chain sits on the evictable list newest-first, i.e. in descending ids).

`touch` takes a reference to a cached block (a prefix-cache hit), taking it off the
evictable list. `free` drops references; a block reaching 0 goes to the evictable list
if it is hashed (its content stays reusable until the pool needs room), else to the
free list.

Invariants (checked by `check_integrity`):
    * ref count 0  <=>  on exactly one of the free list / evictable list;
    * no block is listed twice; free-list blocks have no hash, evictable ones have one;
    * cached[h] == b  <=>  hash(b) == h: the hash map and the per-block hashes agree;
    * num_free_blocks (free + evictable) + num_used_blocks == num_blocks;
    * the free list's own run invariants (`FreeRuns.check`);
    * every remembered tail is referenced (freeing a block forgets its claim).

A block id is an index into the group's cache tensor; the pool only hands out
ids, it never touches memory.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable

from mnemosyne.kv_cache.block_hash import BlockHash
from mnemosyne.kv_cache.free_runs import FreeRuns

PLACEMENT_SCAN_RUNS = 8  # the largest runs a new piece's placement examines


class NoFreeBlocksError(RuntimeError):
    """`BlockPool.allocate(n)` was asked for more blocks than are free."""


class KVCacheIntegrityError(RuntimeError):
    """The block bookkeeping is inconsistent (a bug, or a double free)."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = FreeRuns(num_blocks)  # never-hashed free ids, as maximal runs
        self._tails: dict[int, int] = {}  # each piece's last block -> its claim: the blocks it takes next
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._ref_counts: list[int] = [0] * num_blocks
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}
        self.num_evictions = 0  # cached blocks whose content was dropped to make room

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody references: never-hashed ones plus cached ones that may be evicted."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose content is registered in the prefix cache (referenced or not)."""
        return len(self._cached)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        self._check_id(block_id)
        return self._hash_of[block_id]

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block caching this content, or None."""
        return self._cached.get(block_hash)

    def evictable_order(self) -> list[int]:
        """Evictable blocks, the next one to be evicted first."""
        return list(self._evictable)

    def allocate(self, num_blocks: int, after: int | None = None, num_blocks_ahead: int = 0) -> list[int]:
        """Take `num_blocks` free blocks (ref count 1 each); all or nothing.

        `after`: the last block of the piece being grown (referenced); without it, a new
        piece. `num_blocks_ahead`: the blocks the piece is known to take after these (a
        prompt with tokens left): its claim on the run after it, and a move looks for room
        for them too. Placement as in the module docstring; then cached blocks are evicted,
        least recently freed first (their content is dropped). The ids after the
        in-place part ascend. Raises NoFreeBlocksError, changing nothing, when fewer
        are free.
        """
        if num_blocks < 0 or num_blocks_ahead < 0:
            raise ValueError(
                f"cannot allocate a negative number of blocks ({num_blocks}, {num_blocks_ahead} ahead)"
            )
        if after is not None:
            self._check_id(after)
            if self._ref_counts[after] == 0:
                raise KVCacheIntegrityError(f"growing after block {after}, which nobody references")
        if num_blocks > self.num_free_blocks:
            raise NoFreeBlocksError(
                f"requested {num_blocks} blocks but only {self.num_free_blocks} of {self.num_blocks} are free"
            )
        growing = num_blocks_ahead > 0
        if num_blocks == 0:
            if after in self._tails:
                self._tails[after] = num_blocks_ahead  # inside its last block: a decode, or a small chunk
            return []
        in_place: list[int] = []
        if after is not None:
            self._tails.pop(after, None)
            end = self._free.run_starting_at(after + 1)
            if end is not None:
                in_place = self._free.take(after + 1, after + 1, min(end, after + 1 + num_blocks))
        rest = min(num_blocks - len(in_place), len(self._free))
        placed: list[int] = []
        if rest and after is not None and num_blocks == 1 and not growing:
            placed = self._spill()
        elif rest:
            placed = self._place_room(rest, num_blocks_ahead)
        while len(in_place) + len(placed) < num_blocks:
            b, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of[b]]  # type: ignore[arg-type]  # evictable => hashed
            self._hash_of[b] = None
            self.num_evictions += 1
            placed.append(b)
        placed.sort()
        block_ids = in_place + placed
        for b in block_ids:
            self._ref_counts[b] = 1
        self._tails[block_ids[-1]] = num_blocks_ahead
        return block_ids

    def _claim(self, run_start: int) -> int:
        """The blocks at the start of the free run at `run_start` that its predecessor claims."""
        return self._tails.get(run_start - 1, 0)

    def _spill(self) -> list[int]:
        """One block for a decode whose successor is taken: the last id of the smallest run
        with an unclaimed id (a hole), else the highest free id."""
        for s, e in self._free.smallest_at_least(1, PLACEMENT_SCAN_RUNS):
            if s + self._claim(s) < e:
                return self._free.take(s, e - 1, e)
        s, e = self._free.highest()
        return self._free.take(s, e - 1, e)

    def _place_room(self, num_blocks: int, num_blocks_ahead: int) -> list[int]:
        """A new run of num_blocks (the module docstring's order): best fit for the room of
        num_blocks + num_blocks_ahead past the claims, then the fallbacks."""
        room = num_blocks + num_blocks_ahead
        runs = [(s, e) for s, e in self._free.largest(PLACEMENT_SCAN_RUNS) if e - s >= num_blocks]
        placed = self._past_claim(self._free.smallest_at_least(room, PLACEMENT_SCAN_RUNS), room, num_blocks)
        if placed is None:
            placed = self._past_claim(runs, room, num_blocks)
        if placed is not None:
            return placed
        if runs:
            s, e = runs[0]
            mid = min(s + (e - s) // 2, e - num_blocks)
            if num_blocks_ahead and self._claim(s) and e - mid >= room:
                return self._free.take(s, mid, mid + num_blocks)
            placed = self._past_claim(runs, num_blocks, num_blocks)
            if placed is not None:
                return placed
            lo = mid if num_blocks_ahead else e - num_blocks
            return self._free.take(s, lo, lo + num_blocks)
        chosen: list[tuple[int, int]] = []
        need = num_blocks
        for s, e in self._free.runs_by_start():
            chosen.append((s, min(need, e - s)))
            need -= chosen[-1][1]
            if not need:
                break
        return [b for s, k in chosen for b in self._free.take(s, s, s + k)]

    def _past_claim(self, runs: list[tuple[int, int]], need: int, num_blocks: int) -> list[int] | None:
        """num_blocks right past the claim of the first of `runs` whose unclaimed part holds
        `need` blocks, or None."""
        for s, e in runs:
            lo = s + self._claim(s)
            if e - lo >= need:
                return self._free.take(s, lo, lo + num_blocks)
        return None

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each (already referenced) block."""
        block_ids = list(block_ids)
        for b in block_ids:
            self._check_id(b)
            if self._ref_counts[b] == 0:
                raise KVCacheIntegrityError(f"incref of free block {b}")
        for b in block_ids:
            self._ref_counts[b] += 1

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each cached block (a prefix-cache hit); an unreferenced one
        leaves the evictable list. Validates first: an uncached block changes nothing."""
        block_ids = list(block_ids)
        for b in block_ids:
            self._check_id(b)
            if self._hash_of[b] is None:
                raise KVCacheIntegrityError(f"touch of block {b}, which caches no content")
        for b in block_ids:
            if self._ref_counts[b] == 0:
                del self._evictable[b]
            self._ref_counts[b] += 1

    def cache_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register a referenced, fully computed block under its content hash.

        Returns False (and leaves the block uncached) when another block already
        caches this content: two requests computed the same prefix at once.
        """
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise KVCacheIntegrityError(f"caching free block {block_id}")
        old = self._hash_of[block_id]
        if old is not None:
            if old != block_hash:
                raise KVCacheIntegrityError(f"block {block_id} is cached under another hash")
            return True
        if block_hash in self._cached:
            return False
        self._hash_of[block_id] = block_hash
        self._cached[block_hash] = block_id
        return True

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per listed occurrence, in list order; blocks reaching 0 go to
        the evictable list (hashed: most recently used end) or the free list.

        Validates the whole list first, so a bad id or a double free changes nothing.
        """
        block_ids = list(block_ids)
        for b, n in Counter(block_ids).items():
            self._check_id(b)
            if self._ref_counts[b] < n:
                raise KVCacheIntegrityError(
                    f"freeing block {b} {n} time(s) but its ref count is {self._ref_counts[b]}"
                )
        unhashed: list[int] = []
        for b in block_ids:
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                if self._hash_of[b] is None:
                    unhashed.append(b)
                else:
                    self._evictable[b] = None
                self._tails.pop(b, None)
        self._free.add(unhashed)

    def check_integrity(self) -> None:
        problem = self._free.check()
        if problem is not None:
            raise KVCacheIntegrityError(f"free list: {problem}")
        free_set = set(self._free.ids())
        both = free_set & self._evictable.keys()
        if both:
            raise KVCacheIntegrityError(f"blocks {sorted(both)[:4]} are on the free and evictable lists")
        for b, rc in enumerate(self._ref_counts):
            if rc < 0:
                raise KVCacheIntegrityError(f"block {b} has negative ref count {rc}")
            listed = b in free_set or b in self._evictable
            if listed != (rc == 0):
                where = "on" if listed else "off"
                raise KVCacheIntegrityError(f"block {b} is {where} the free list with ref count {rc}")
            h = self._hash_of[b]
            if b in free_set and h is not None:
                raise KVCacheIntegrityError(f"block {b} on the free list still caches content")
            if b in self._evictable and h is None:
                raise KVCacheIntegrityError(f"evictable block {b} caches no content")
            if h is not None and self._cached.get(h) != b:
                raise KVCacheIntegrityError(f"block {b}'s hash maps to block {self._cached.get(h)}")
        if sum(h is not None for h in self._hash_of) != len(self._cached):
            raise KVCacheIntegrityError(
                f"{len(self._cached)} hashes cached but {sum(h is not None for h in self._hash_of)} "
                "blocks carry one"
            )
        num_used = sum(1 for rc in self._ref_counts if rc > 0)
        if num_used + self.num_free_blocks != self.num_blocks:
            raise KVCacheIntegrityError(
                f"{self.num_free_blocks} free + {num_used} used != {self.num_blocks} blocks"
            )
        freed_tails = [b for b in self._tails if self._ref_counts[b] == 0]
        if freed_tails:
            raise KVCacheIntegrityError(f"blocks {freed_tails[:4]} are remembered as tails but free")

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise KVCacheIntegrityError(f"block id {block_id} out of range [0, {self.num_blocks})")
