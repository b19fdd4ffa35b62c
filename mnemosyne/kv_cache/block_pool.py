"""A pool of fixed-size KV blocks for one KVP group, with reference counts.

::

    block ids:   0 1 2 3 4 5 6 7          (num_blocks = 8)
    ref counts:  1 0 2 0 1 0 0 1
    free list:   deque([3, 5, 1, 6])      FIFO: allocate() pops the left end,
                                          free() appends at the right end

Invariants (checked by `check_integrity`):
    * a block is on the free list  <=>  its ref count is 0;
    * the free list holds no block twice;
    * num_free_blocks + num_used_blocks == num_blocks.

A block id is an index into the group's cache tensor; the pool only hands out
ids, it never touches memory.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable


class NoFreeBlocksError(RuntimeError):
    """`BlockPool.allocate(n)` was asked for more blocks than are free."""


class KVCacheIntegrityError(RuntimeError):
    """The block bookkeeping is inconsistent (a bug, or a double free)."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts: list[int] = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks (ref count 1 each); all or nothing.

        Raises NoFreeBlocksError, changing nothing, when fewer are free.
        """
        if num_blocks < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({num_blocks})")
        if num_blocks > len(self._free):
            raise NoFreeBlocksError(
                f"requested {num_blocks} blocks but only {len(self._free)} of {self.num_blocks} are free"
            )
        block_ids = [self._free.popleft() for _ in range(num_blocks)]
        for b in block_ids:
            self._ref_counts[b] = 1
        return block_ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each (already allocated) block."""
        block_ids = list(block_ids)
        for b in block_ids:
            self._check_id(b)
            if self._ref_counts[b] == 0:
                raise KVCacheIntegrityError(f"incref of free block {b}")
        for b in block_ids:
            self._ref_counts[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per listed occurrence; blocks reaching 0 return to the free list.

        Validates the whole list first, so a bad id or a double free changes nothing.
        """
        counts = Counter(block_ids)
        for b, n in counts.items():
            self._check_id(b)
            if self._ref_counts[b] < n:
                raise KVCacheIntegrityError(
                    f"freeing block {b} {n} time(s) but its ref count is {self._ref_counts[b]}"
                )
        for b, n in counts.items():
            self._ref_counts[b] -= n
            if self._ref_counts[b] == 0:
                self._free.append(b)

    def check_integrity(self) -> None:
        free_set = set(self._free)
        if len(free_set) != len(self._free):
            dup = [b for b, n in Counter(self._free).items() if n > 1]
            raise KVCacheIntegrityError(f"free list holds blocks {dup} more than once")
        for b, rc in enumerate(self._ref_counts):
            if rc < 0:
                raise KVCacheIntegrityError(f"block {b} has negative ref count {rc}")
            if (b in free_set) != (rc == 0):
                where = "on" if b in free_set else "off"
                raise KVCacheIntegrityError(f"block {b} is {where} the free list with ref count {rc}")
        num_used = sum(1 for rc in self._ref_counts if rc > 0)
        if num_used + len(self._free) != self.num_blocks:
            raise KVCacheIntegrityError(
                f"{len(self._free)} free + {num_used} used != {self.num_blocks} blocks"
            )

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise KVCacheIntegrityError(f"block id {block_id} out of range [0, {self.num_blocks})")
