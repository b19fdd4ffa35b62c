"""BlockPool and KVCacheManager: allocation, ref counts, pieces across KVP groups."""

from __future__ import annotations

import random

import pytest

from mnemosyne.config import CacheConfig
from mnemosyne.errors import ConfigError
from mnemosyne.kv_cache.block_pool import BlockPool, KVCacheIntegrityError, NoFreeBlocksError
from mnemosyne.kv_cache.manager import KVCacheManager
from mnemosyne.kv_cache.pieces import slot_of, slots_of

# ---- BlockPool ------------------------------------------------------------------------------


def test_pool_new_pieces_take_the_lowest_free_ids():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    assert (pool.num_free_blocks, pool.num_used_blocks) == (2, 2)
    pool.free([1])
    pool.free([0])
    # A new piece takes the lowest free ids, ascending, whatever order they were freed in.
    assert pool.allocate(4) == [0, 1, 2, 3]
    assert pool.num_free_blocks == 0
    pool.check_integrity()


def test_pool_allocate_all_or_nothing():
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(NoFreeBlocksError, match="requested 2 blocks but only 1"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    assert pool.allocate(0) == []
    pool.check_integrity()


def test_pool_refcount_and_double_free():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.incref([b])
    assert pool.ref_count(b) == 2
    pool.free([b])
    assert pool.num_free_blocks == 1 and pool.ref_count(b) == 1
    pool.free([b])
    assert pool.num_free_blocks == 2
    with pytest.raises(KVCacheIntegrityError, match="ref count is 0"):
        pool.free([b])
    with pytest.raises(KVCacheIntegrityError, match="incref of free block"):
        pool.incref([b])
    pool.check_integrity()


def test_pool_free_validates_whole_list_first():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    with pytest.raises(KVCacheIntegrityError):
        pool.free([a, b, b])  # b has one reference only
    assert pool.num_used_blocks == 2  # nothing changed
    with pytest.raises(KVCacheIntegrityError, match="out of range"):
        pool.free([7])
    pool.check_integrity()


def test_pool_integrity_detects_corruption():
    pool = BlockPool(3)
    pool.allocate(1)
    pool._free.add([2])  # already free: a second, overlapping run
    with pytest.raises(KVCacheIntegrityError, match="overlap"):
        pool.check_integrity()

    pool = BlockPool(3)
    (b,) = pool.allocate(1)
    pool._ref_counts[b] = 0  # used block with ref 0
    with pytest.raises(KVCacheIntegrityError, match="off the free list"):
        pool.check_integrity()


# ---- KVCacheManager -------------------------------------------------------------------------


def _mgr(block_size: int = 4, blocks: tuple[int, ...] = (8,), t: int | None = None) -> KVCacheManager:
    return KVCacheManager(CacheConfig(block_size, blocks, t))


def test_manager_rejects_bad_config():
    with pytest.raises(ConfigError, match=r"\(6\).*\(4\)"):
        _mgr(4, (8, 8), t=6)
    with pytest.raises(ConfigError):
        _mgr(4, ())


def test_manager_block_boundaries():
    m = _mgr(block_size=4)
    assert m.allocate_slots("a", 1)
    assert len(m.pieces("a")[0].block_ids) == 1
    assert m.allocate_slots("a", 4)
    assert len(m.pieces("a")[0].block_ids) == 1
    assert m.allocate_slots("a", 5)
    (piece,) = m.pieces("a")
    assert (piece.group, piece.token_start, piece.token_end, len(piece.block_ids)) == (0, 0, 5, 2)
    assert m.allocate_slots("a", 3)  # already reserved: no-op
    assert m.pieces("a")[0].token_end == 5
    assert m.num_free_blocks() == 6
    assert m.blocks_needed(0) == 0 and m.blocks_needed(8) == 2 and m.blocks_needed(9) == 3
    m.check_integrity()


def test_manager_all_or_nothing_and_free():
    m = _mgr(block_size=4, blocks=(4,))
    assert m.allocate_slots("a", 10)  # 3 blocks
    assert not m.allocate_slots("b", 8)  # needs 2, 1 free
    assert not m.has_request("b") and m.pieces("b") == []
    assert not m.allocate_slots("a", 17)  # needs 2 more
    assert m.pieces("a")[0].token_end == 10 and m.num_free_blocks() == 1
    assert m.allocate_slots("a", 16)
    assert m.usage() == [1.0]
    m.check_integrity()
    m.free("a")
    m.free("a")  # unknown: no-op
    assert m.num_free_blocks() == 4 and m.usage() == [0.0]
    assert m.allocate_slots("b", 16)
    m.check_integrity()


def test_manager_capacity():
    assert _mgr(4, (8, 6)).capacity_tokens == 56
    assert _mgr(4, (8, 6)).capacity_tokens_per_request == 32  # stays on one group
    assert _mgr(4, (8, 6), t=16).capacity_tokens_per_request == 32
    assert _mgr(4, (8, 2, 6), t=12).capacity_tokens_per_request == 12 + 12 + 8
    assert _mgr(2, (4, 4, 4), t=4).capacity_tokens_per_request == 12


def test_manager_onboards_groups_most_free_first():
    m = _mgr(block_size=2, blocks=(4, 6, 5), t=4)
    assert m.allocate_slots("x", 2)  # x starts on the emptiest group: 1
    assert [p.group for p in m.pieces("x")] == [1]
    assert m.allocate_slots("a", 10)
    pieces = m.pieces("a")
    # a starts on group 1 (5 free), then the most free it does not use: 2 (5), then 0 (4).
    assert [(p.group, p.token_start, p.token_end) for p in pieces] == [(1, 0, 4), (2, 4, 8), (0, 8, 10)]
    assert [len(p.block_ids) for p in pieces] == [2, 2, 1]
    assert not m.allocate_slots("a", 13)  # every group used and the newest piece is full at 12
    assert m.allocate_slots("a", 12)
    assert not m.allocate_slots("a", 13)
    m.check_integrity()


def test_manager_chunks_never_straddle_groups():
    m = _mgr(block_size=2, blocks=(4, 4, 4), t=4)
    assert m.num_tokens_to_group_end("new", 0) == 4
    pos = 0
    for want in (3, 5, 1, 2, 7, 5):
        limit = m.num_tokens_to_group_end("a", pos)
        n = min(want, limit)
        assert n >= 1
        assert pos // 4 == (pos + n - 1) // 4  # one group
        assert m.allocate_slots("a", pos + n)
        pos += n
        m.check_integrity()
    assert pos == 12
    pieces = m.pieces("a")
    assert [p.token_start for p in pieces] == [0, 4, 8]
    assert len({p.group for p in pieces}) == 3
    assert m.num_tokens_to_group_end("a", 12) == 4  # a fourth piece would be needed
    assert not m.allocate_slots("a", 13)
    assert _mgr().num_tokens_to_group_end("a", 5) is None


def test_manager_slots_are_disjoint():
    m = _mgr(block_size=2, blocks=(6, 6), t=4)
    for rid, n in (("a", 7), ("b", 5), ("c", 3)):
        assert m.allocate_slots(rid, n)
    seen: set[tuple[int, int]] = set()
    for rid, n in (("a", 7), ("b", 5), ("c", 3)):
        pieces = m.pieces(rid)
        for t in range(n):
            (piece,) = [p for p in pieces if p.token_start <= t < p.token_end]
            key = (piece.group, piece.slot(t, m.block_size))
            assert key not in seen
            seen.add(key)
    m.check_integrity()


def test_manager_capacity_exhaustion_and_integrity_errors():
    m = _mgr(block_size=2, blocks=(2, 2), t=4)
    assert m.allocate_slots("a", 4)
    assert m.allocate_slots("b", 4)
    assert not m.allocate_slots("c", 1)
    assert not m.allocate_slots("a", 5)  # the other group is full
    assert m.usage() == [1.0, 1.0]
    m.check_integrity()
    m._pieces["b"][0].block_ids.pop()  # a block leaked
    with pytest.raises(KVCacheIntegrityError):
        m.check_integrity()


def test_mirrored_piece_tracks_its_leading_block_run():
    """The worker's mirror keeps (first block, run length) of the ascending run that starts a
    piece, extended only while appended ids continue it (the cuDNN path reads it as a view)."""
    from mnemosyne.worker.block_table import MirroredPiece

    piece = MirroredPiece(0)
    piece.append([])
    assert piece.run == (0, 0)
    piece.append([5, 6, 7])
    assert piece.run == (5, 3)
    piece.append([8, 20])
    assert piece.run == (5, 4)
    piece.append([21])
    assert piece.run == (5, 4) and piece.table().tolist() == [5, 6, 7, 8, 20, 21]


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_slots_of_a_range_match_slot_of_each_token(block_size):
    """A range's slots, built a block at a time, are `slot_of` of each of its tokens: ranges
    starting and ending mid-block, inside one block, empty, and a piece starting mid-request."""
    rng = random.Random(block_size)
    block_ids = rng.sample(range(1000), 12)
    token_start = 37
    end_of_piece = token_start + len(block_ids) * block_size
    for _ in range(200):
        start = rng.randrange(token_start, end_of_piece + 1)
        end = rng.randrange(start, end_of_piece + 1)
        want = [slot_of(block_ids, token_start, t, block_size) for t in range(start, end)]
        assert slots_of(block_ids, token_start, start, end, block_size) == want
