"""When one Triton chunk launch becomes two: a long prefix's few tiles beside many short ones.

One launch runs every tile at one split count, the count its longest sequence needs; a
shorter sequence fills only its first splits (`min_split_keys`) and its other programs are
empty::

    one launch, 32 splits:  short prompt   73 tiles x 8 KV heads x 32 splits: keys in 2-4 of them
                            long prefix     2 tiles x 8 KV heads x 32 splits: 12.7K keys each
    two launches:           short prompt   73 x 8 x  2   (its own balanced count)
                            long prefix     2 x 8 x 32

Measured on an H200 (1B heads, one layer, 2026-11-30, benchmarks/results/session10_h200x2_2026-11-30/):
a 2340-token prompt beside a 64-token chunk after 408K keys took 1.49 ms in one launch, the
two alone 0.31 and 0.69 ms (phase 1 of the short prompt's tiles: 0.15 ms alone, about 0.7 ms
at the long prefix's 32 splits). So the longest tiled sequence gets a launch of its own when

    the one launch's split count >= SOLO_SPLITS_RATIO x the others' own: the others would run
    at several times the splits they need (not so when their keys are many too: then the
    one launch's balanced count stays low, and its programs are evenly loaded), and
    the others' tiles fill the GPU on their own (tiles x KV heads >= SMs): a launch of a few
    small tiles would cost more than their empty programs

Each launch writes only its own sequences' rows of out / lse, with its own split workspace.
A CUDA graph of a mixed step keeps one launch over every tile (`static_plan.py`: its grid is
fixed when captured).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from mnemosyne.kernels.paged_prefill import plan_query_tiles
from mnemosyne.layers.attention.kernel_plan import TileGroup

SOLO_SPLITS_RATIO = 4

# (num_tiles, longest sequence's keys, keys summed over the tiles) -> the launch's split count
SplitsFor = Callable[[int, int, int], int]


def _rows(query_lens: Sequence[int], seqs: list[int]) -> list[int]:
    """The packed rows of the sequences `seqs`."""
    qsl = list(itertools.accumulate(query_lens, initial=0))
    return [r for i in seqs for r in range(qsl[i], qsl[i + 1])]


def _launch_splits(
    kv_lens: Sequence[int], seqs: list[int], tile_seq: list[int], splits_for: SplitsFor
) -> int:
    """The split count of one launch over the tiles `tile_seq` of the sequences `seqs`."""
    return splits_for(len(tile_seq), max(kv_lens[i] for i in seqs), sum(kv_lens[s] for s in tile_seq))


def tile_group(
    query_lens: Sequence[int], kv_lens: Sequence[int], seqs: list[int], block_q: int, splits_for: SplitsFor
) -> TileGroup:
    """One launch over the sequences `seqs` (indices into the batch)."""
    tile_seq, tile_q_offset = plan_query_tiles(list(query_lens), seqs, block_q)
    return TileGroup(
        tile_seq, tile_q_offset, _rows(query_lens, seqs), _launch_splits(kv_lens, seqs, tile_seq, splits_for)
    )


def _subgroup(
    one: TileGroup, seqs: list[int], query_lens: Sequence[int], kv_lens: Sequence[int], splits_for: SplitsFor
) -> TileGroup:
    """The launch over `seqs`, its tiles taken from `one` (a sequence's tiles do not depend on
    the others'), at its own split count."""
    keep = set(seqs)
    tiles = [(s, o) for s, o in zip(one.tile_seq, one.tile_q_offset, strict=True) if s in keep]
    tile_seq = [s for s, _ in tiles]
    splits = _launch_splits(kv_lens, seqs, tile_seq, splits_for)
    return TileGroup(tile_seq, [o for _, o in tiles], _rows(query_lens, seqs), splits)


def tile_groups(
    one: TileGroup,
    query_lens: Sequence[int],
    kv_lens: Sequence[int],
    tiled: list[int],
    num_kv_heads: int,
    num_sms: int,
    splits_for: SplitsFor,
) -> list[TileGroup]:
    """[the others' launch, the longest sequence's] when the longest gets its own instead of
    the one launch `one` over every tile (module docstring), else []. Host time: the cheap
    tests first (most steps stop at the first line)."""
    if len(tiled) < 2 or one.splits < SOLO_SPLITS_RATIO:
        return []
    longest = max(tiled, key=kv_lens.__getitem__)
    if sum(s != longest for s in one.tile_seq) * num_kv_heads < num_sms:
        return []
    others = _subgroup(one, [i for i in tiled if i != longest], query_lens, kv_lens, splits_for)
    if one.splits < SOLO_SPLITS_RATIO * others.splits:
        return []
    return [others, _subgroup(one, [longest], query_lens, kv_lens, splits_for)]
