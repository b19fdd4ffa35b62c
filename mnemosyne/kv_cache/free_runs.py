"""The never-hashed free blocks of a `BlockPool`, kept as maximal runs of consecutive ids.

::

    block ids:   0  1  2  3  4  5  6  7  8  9          (num_blocks = 10)
    free:        .  x  x  x  .  .  x  .  x  x          x: on the free list
    runs:           [1,    4)       [6,7)  [8,  10)     maximal: never adjacent, never overlapping
    end_of:      {1: 4, 6: 7, 8: 10}                    run start -> end (exclusive)
    start_of:    {4: 1, 7: 6, 10: 8}                    run end -> start
    by_size:     SortedList([(1, 6), (2, 8), (3, 1)])   (length, start), largest last
    by_start:    SortedList([1, 6, 8])

Invariants (checked by `check`): end_of and start_of are inverse maps of the same runs;
by_size and by_start list exactly those runs; runs are non-empty, disjoint and maximal
(no run ends where another starts); `len` is the sum of the lengths. Taking or adding k
ids costs O(k + r log R) for the r runs touched (R runs in all); nothing scans the pool.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

from sortedcontainers import SortedList


class FreeRuns:
    def __init__(self, num_blocks: int) -> None:
        self._end_of: dict[int, int] = {}
        self._start_of: dict[int, int] = {}
        self._by_size: SortedList = SortedList()
        self._by_start: SortedList = SortedList()
        self._len = 0
        if num_blocks:
            self._insert(0, num_blocks)

    def __len__(self) -> int:
        return self._len

    def run_starting_at(self, start: int) -> int | None:
        """The end of the run starting at `start`, or None."""
        return self._end_of.get(start)

    def largest(self, k: int) -> list[tuple[int, int]]:
        """Up to k runs as (start, end), largest first (ties: higher start first)."""
        return [(s, s + n) for n, s in islice(reversed(self._by_size), k)]

    def smallest_at_least(self, n: int, k: int) -> list[tuple[int, int]]:
        """Up to k runs of at least n ids as (start, end), smallest first (ties: lower start
        first): O(log R + k)."""
        return [(s, s + m) for m, s in islice(self._by_size.irange((n, -1)), k)]

    def highest(self) -> tuple[int, int]:
        s = self._by_start[-1]
        return s, self._end_of[s]

    def runs_by_start(self) -> Iterator[tuple[int, int]]:
        """Every run as (start, end), lowest first (iterate a copy if you take while iterating)."""
        return ((s, self._end_of[s]) for s in self._by_start)

    def take(self, run_start: int, lo: int, hi: int) -> list[int]:
        """Remove ids [lo, hi), which lie in the run starting at `run_start`; returns them."""
        end = self._end_of[run_start]
        if not run_start <= lo < hi <= end:
            raise ValueError(f"[{lo}, {hi}) is not inside the free run [{run_start}, {end})")
        self._remove(run_start, end)
        if run_start < lo:
            self._insert(run_start, lo)
        if hi < end:
            self._insert(hi, end)
        return list(range(lo, hi))

    def add(self, block_ids: Iterable[int]) -> None:
        """Put ids (not free yet, distinct) back, merging them with the runs around them."""
        ids = sorted(block_ids)
        i = 0
        while i < len(ids):
            lo = ids[i]
            j = i + 1
            while j < len(ids) and ids[j] == ids[j - 1] + 1:
                j += 1
            hi = ids[j - 1] + 1
            before = self._start_of.get(lo)
            if before is not None:
                self._remove(before, lo)
                lo = before
            after = self._end_of.get(hi)
            if after is not None:
                self._remove(hi, after)
                hi = after
            self._insert(lo, hi)
            i = j

    def ids(self) -> Iterator[int]:
        for s, e in self.runs_by_start():
            yield from range(s, e)

    def check(self) -> str | None:
        """What breaks the invariants above, or None."""
        runs = sorted(self._end_of.items())
        if {e: s for s, e in runs} != self._start_of:
            return "run start and end maps disagree"
        if list(self._by_start) != [s for s, _ in runs] or sorted(self._by_size) != sorted(
            (e - s, s) for s, e in runs
        ):
            return "the sorted run indexes disagree with the runs"
        for (s0, e0), (s1, e1) in zip(runs, runs[1:], strict=False):
            if e0 >= s1:
                return f"free runs [{s0}, {e0}) and [{s1}, {e1}) overlap or touch"
        if any(e <= s for s, e in runs):
            return "an empty free run"
        if sum(e - s for s, e in runs) != self._len:
            return f"the runs hold {sum(e - s for s, e in runs)} ids, not {self._len}"
        return None

    def _insert(self, start: int, end: int) -> None:
        self._end_of[start] = end
        self._start_of[end] = start
        self._by_size.add((end - start, start))
        self._by_start.add(start)
        self._len += end - start

    def _remove(self, start: int, end: int) -> None:
        del self._end_of[start]
        del self._start_of[end]
        self._by_size.remove((end - start, start))
        self._by_start.remove(start)
        self._len -= end - start
