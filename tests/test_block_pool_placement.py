"""BlockPool placement: in-place growth, claims, spills; LRU eviction unchanged."""

from __future__ import annotations

import random

import pytest

from mnemosyne.config import CacheConfig
from mnemosyne.kv_cache.block_pool import BlockPool, KVCacheIntegrityError
from mnemosyne.kv_cache.manager import KVCacheManager


def _breaks(block_ids: list[int]) -> int:
    return sum(1 for a, b in zip(block_ids, block_ids[1:], strict=False) if b != a + 1)


def test_growth_in_place_spills_and_claims():
    pool = BlockPool(20)
    a = pool.allocate(3)
    assert a == [0, 1, 2]  # best fit: the only run
    b = pool.allocate(2)
    assert b == [3, 4]  # packs right after a, which claims nothing (no blocks ahead)
    assert pool.allocate(1, after=b[-1]) == [5]  # in place
    assert pool.allocate(1, after=a[-1]) == [19]  # a decode whose successor is taken: no hole, the highest id
    p = pool.allocate(2, num_blocks_ahead=6)
    assert p == [6, 7]  # a prompt's first chunk, claiming [8, 14)
    assert pool.allocate(3) == [14, 15, 16]  # a new piece keeps off the claim
    assert pool.allocate(4, after=p[-1], num_blocks_ahead=2) == [8, 9, 10, 11]  # in place, claims [12, 14)
    pool.check_integrity()
    with pytest.raises(KVCacheIntegrityError, match="nobody references"):
        pool.allocate(1, after=12)
    with pytest.raises(KVCacheIntegrityError, match="out of range"):
        pool.allocate(1, after=20)


def test_a_decode_spills_into_a_hole_before_the_top():
    pool = BlockPool(12)
    x, y, z = pool.allocate(2), pool.allocate(2), pool.allocate(2)
    assert (x, y, z) == ([0, 1], [2, 3], [4, 5])
    pool.free(y)  # a hole [2, 4) and the top run [6, 12)
    assert pool.allocate(1, after=z[-1]) == [6]  # in place
    w = pool.allocate(3)
    assert w == [7, 8, 9]  # best fit: the smallest run that holds 3
    assert pool.allocate(1, after=6) == [3]  # z's successor is taken: the end of the hole
    assert pool.allocate(1, after=w[-1]) == [10]  # in place
    assert pool.allocate(1, after=3) == [2]  # z again: what is left of the hole, not the top
    assert pool.allocate(1, after=2) == [11]  # no hole left: the highest id
    pool.check_integrity()


def test_a_new_piece_keeps_off_a_run_that_a_prefill_grows_into():
    pool = BlockPool(40)
    long_prompt = pool.allocate(8, num_blocks_ahead=16)  # claims [8, 24)
    long_prompt += pool.allocate(8, after=long_prompt[-1], num_blocks_ahead=8)  # claims [16, 24)
    assert long_prompt == list(range(16))
    assert pool.allocate(4) == [24, 25, 26, 27]  # a new request: past the claim
    assert pool.allocate(8, after=long_prompt[-1]) == list(range(16, 24))
    pool.allocate(0, after=23)  # the prompt is done, it decodes inside its last block
    assert pool.allocate(4) == [28, 29, 30, 31]  # packs behind the last
    pool.check_integrity()


def test_growth_never_takes_a_cached_successor_out_of_lru_order():
    pool = BlockPool(6)
    a, c = pool.allocate(2)
    assert pool.cache_block(c, b"c" * 32)
    pool.free([c])
    assert pool.allocate(1, after=a) == [5]  # 1 caches content: left for LRU eviction
    assert pool.lookup(b"c" * 32) == c and pool.num_evictions == 0
    assert pool.allocate(3, after=5) == [2, 3, 4]  # the free ones, before any eviction
    assert pool.allocate(1, after=a) == [c] and pool.num_evictions == 1  # LRU: the only one
    pool.check_integrity()


def test_evicted_blocks_are_the_lru_ones_returned_ascending():
    pool = BlockPool(8)
    blocks = pool.allocate(8)
    for i, b in enumerate(blocks):
        pool.cache_block(b, bytes([i]) * 32)
    pool.free(reversed(blocks[:6]))  # a request frees its newest block first
    assert pool.evictable_order() == [5, 4, 3, 2, 1, 0]
    assert pool.allocate(4) == [2, 3, 4, 5]  # the 4 least recently freed, ascending
    assert pool.evictable_order() == [1, 0] and pool.lookup(bytes([0]) * 32) == 0
    pool.check_integrity()


def test_random_operations_keep_the_invariants_and_lru_eviction():
    rng = random.Random(1)
    pool = BlockPool(64)
    owned: list[list[int]] = []
    next_hash = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.45 and pool.num_free_blocks:
            n = rng.randint(0, min(6, pool.num_free_blocks))
            grow = owned and rng.random() < 0.6
            seq = rng.choice(owned) if grow else []
            lru, num_unhashed = pool.evictable_order(), pool.num_free_blocks - pool.num_evictable_blocks
            ahead = rng.choice((0, 0, 5))
            got = (
                pool.allocate(n, after=seq[-1], num_blocks_ahead=ahead)
                if seq
                else pool.allocate(n, num_blocks_ahead=ahead)
            )
            evicted = [b for b in got if b in lru]
            assert sorted(evicted) == sorted(lru[: max(0, n - num_unhashed)])  # LRU order, as before
            assert pool.evictable_order() == lru[len(evicted) :]
            k = 0
            while seq and k < len(got) and got[k] == seq[-1] + 1 + k:
                k += 1
            assert got[k:] == sorted(got[k:])
            seq.extend(got)
            if not grow and got:
                owned.append(seq)
        elif op < 0.65 and owned:
            seq = owned.pop(rng.randrange(len(owned)))
            pool.free(reversed(seq))
        elif op < 0.85 and owned:
            b = rng.choice(rng.choice(owned))
            if pool.block_hash(b) is None:
                pool.cache_block(b, next_hash.to_bytes(32, "little"))
                next_hash += 1
        elif pool.num_evictable_blocks:  # a prefix-cache hit
            b = rng.choice(pool.evictable_order())
            pool.touch([b])
            owned.append([b])
        pool.check_integrity()


def test_long_prompt_beside_desynchronized_decodes_is_one_run():
    """32 decodes with different lengths cross block boundaries at different steps while a
    long prompt grows 8 blocks a step: its blocks stay one run; the decodes spill high."""
    m = KVCacheManager(CacheConfig(block_size=64, num_blocks_per_group=(15000,)))
    tokens = {f"short-{i}": 1024 + 2 * i for i in range(32)}
    for rid, n in tokens.items():
        assert m.allocate_slots(rid, n)
    for rid in tokens:  # one decode step before the long prompt arrives
        tokens[rid] += 1
        assert m.allocate_slots(rid, tokens[rid])
    for step in range(400):
        assert m.allocate_slots("long", 512 * (step + 1))
        for rid in tokens:
            tokens[rid] += 1
            assert m.allocate_slots(rid, tokens[rid])
    m.check_integrity()
    (piece,) = m.pieces("long")
    assert len(piece.block_ids) == 3200 and _breaks(piece.block_ids) == 0
    m.free("long")
    for rid in tokens:
        m.free(rid)
    m.check_integrity()
    assert m.num_free_blocks() == 15000


def _small_chunks_among_arrivals(pass_known_tokens: bool) -> int:
    """A 64K-token prompt prefilled 32 tokens a step (a late adaptive chunk: half a block)
    while 8 short requests decode and a new one arrives every 50 steps; the prompt's breaks."""
    m = KVCacheManager(CacheConfig(block_size=64, num_blocks_per_group=(4000,)))
    tokens = {f"short-{i}": 1000 + 37 * i for i in range(8)}
    for rid, n in tokens.items():
        assert m.allocate_slots(rid, n, num_known_tokens=n)
    prompt_len = 65536
    for step in range(prompt_len // 32):
        end = 32 * (step + 1)
        assert m.allocate_slots("long", end, num_known_tokens=prompt_len if pass_known_tokens else 0)
        for rid in tokens:
            tokens[rid] += 1
            assert m.allocate_slots(rid, tokens[rid], num_known_tokens=tokens[rid] - 1)
        if step % 50 == 49:
            rid = f"short-{len(tokens)}"
            tokens[rid] = 2000
            assert m.allocate_slots(rid, 512, num_known_tokens=2000)  # its first chunk
            assert m.allocate_slots(rid, 2000, num_known_tokens=2000)
    m.check_integrity()
    (piece,) = m.pieces("long")
    return _breaks(piece.block_ids)


def test_a_prompt_growing_in_small_chunks_keeps_one_run():
    """Chunks of one block or less no longer drop the prompt's claim on the run after it
    (before `num_known_tokens`, each such chunk whose successor a newcomer had taken spilled
    to the top, and the growth upward met the spills coming down)."""
    assert _small_chunks_among_arrivals(pass_known_tokens=True) == 0
    assert _small_chunks_among_arrivals(pass_known_tokens=False) > 10


def test_two_prompts_growing_at_once_split_the_largest_run():
    pool = BlockPool(40)
    a = pool.allocate(2, num_blocks_ahead=100)
    assert a == [0, 1]  # no run holds its room: the largest, claiming [2, 40)
    b = pool.allocate(2, num_blocks_ahead=10)
    assert b == [21, 22]  # a's claim leaves no room: the middle of the largest, room for 10 more
    short = pool.allocate(2)
    assert short == [33, 34]  # best fit: past b's claim [23, 33) in the smallest run
    for _ in range(10):
        a += pool.allocate(1, after=a[-1], num_blocks_ahead=5)
        b += pool.allocate(1, after=b[-1], num_blocks_ahead=5)
    assert _breaks(a) == 0 and _breaks(b) == 0
    pool.check_integrity()


def test_long_prompt_after_short_prompts_prefilled_in_chunks_is_one_run():
    """32 short prompts whose first chunks arrive a few per step (each a prompt with blocks
    ahead) and then decode; a 256K-token prompt arrives and grows 64 blocks a chunk while they
    decode. Best fit packs the short ones, so the long one finds a run for all its blocks (when
    growers took the middle of the largest run, the shorts cut the pool into 32 runs of ~440
    blocks and the long prompt took 7 runs: its cuDNN chunks gathered every prefix segment)."""
    m = KVCacheManager(CacheConfig(block_size=64, num_blocks_per_group=(14259,)))
    tokens: dict[str, int] = {}
    for step in range(8):
        for i in range(4):  # 4 prompts' first chunks a step, then their rest
            rid = f"short-{4 * step + i}"
            assert m.allocate_slots(rid, 384, num_known_tokens=1024)
            tokens[rid] = 1024
        for rid in list(tokens)[-4:]:
            assert m.allocate_slots(rid, 1024, num_known_tokens=1024)
    long_len = 262144
    for end in range(4096, long_len + 1, 4096):
        assert m.allocate_slots("long", end, num_known_tokens=long_len)
        for _ in range(45):  # the decode steps beside one chunk
            for rid in tokens:
                tokens[rid] += 1
                assert m.allocate_slots(rid, tokens[rid], num_known_tokens=tokens[rid])
    m.check_integrity()
    (piece,) = m.pieces("long")
    assert len(piece.block_ids) == 4096 and _breaks(piece.block_ids) == 0


def test_manager_grows_pieces_in_place_across_kvp_groups():
    m = KVCacheManager(CacheConfig(block_size=4, num_blocks_per_group=(16, 16), max_tokens_per_kvp_group=32))
    assert m.allocate_slots("a", 8) and m.allocate_slots("b", 4)
    for end in range(12, 60, 4):
        assert m.allocate_slots("a", end)
    m.check_integrity()
    pieces = m.pieces("a")
    assert [p.num_tokens for p in pieces] == [32, 24]
    assert all(_breaks(p.block_ids) == 0 for p in pieces)
