"""Prefix caching without a model: block hashes, the pool's hash map and LRU eviction, the
manager's take-over of cached blocks across KVP groups, and the scheduler under abort storms."""

from __future__ import annotations

import random

import pytest
from test_scheduler import EOS, check_step, toy_token

from mnemosyne.config import CacheConfig, SchedulerConfig
from mnemosyne.engine.scheduler import Scheduler
from mnemosyne.kv_cache.block_hash import BlockHasher
from mnemosyne.kv_cache.block_pool import BlockPool, KVCacheIntegrityError
from mnemosyne.kv_cache.manager import KVCacheManager
from mnemosyne.request import Request, RequestStatus
from mnemosyne.sampling_params import SamplingParams

# ---- hashing --------------------------------------------------------------------------------


def test_block_hash_chains_the_whole_prefix_and_the_salt():
    h = BlockHasher(4, "model-a")
    a = list(range(10, 22))  # 3 full blocks
    ha: list[bytes] = []
    h.extend(ha, a)
    assert len(ha) == 3 and len(set(ha)) == 3
    hb: list[bytes] = []
    h.extend(hb, [99] + a[1:] + [7, 7])  # block 0 differs: every later hash differs, partial ignored
    assert len(hb) == 3 and not set(ha) & set(hb)
    hc: list[bytes] = []
    h.extend(hc, a[:8] + [0, 0, 0, 0])  # diverges in block 2 only
    assert hc[:2] == ha[:2] and hc[2] != ha[2]
    hs: list[bytes] = []
    BlockHasher(4, "model-b").extend(hs, a)
    assert not set(hs) & set(ha)  # another model's KV never matches
    # Incremental growth over prompt + outputs equals hashing the concatenation at once.
    inc: list[bytes] = []
    out: list[int] = []
    h.extend(inc, a[:6], out)
    assert len(inc) == 1
    for t in a[6:]:
        out.append(t)
        h.extend(inc, a[:6], out)
    assert inc == ha
    with pytest.raises(ValueError, match="holds 4 tokens"):
        h.hash_block(None, [1, 2, 3])


# ---- the pool ---------------------------------------------------------------------------------


def test_pool_cached_blocks_stay_until_needed_then_evict_lru():
    pool = BlockPool(5)
    blocks = pool.allocate(4)
    assert blocks == [0, 1, 2, 3]
    for b in blocks[:3]:
        assert pool.cache_block(b, bytes([b]) * 32)
    assert not pool.cache_block(3, bytes([0]) * 32)  # the same content is cached already: not twice
    assert pool.num_cached_blocks == 3 and pool.block_hash(3) is None
    pool.free([2, 0, 3, 1])
    pool.check_integrity()
    assert pool.num_free_blocks == 5 and pool.num_used_blocks == 0
    assert pool.evictable_order() == [2, 0, 1]  # least recently freed first; 3 was never cached
    # A hit takes a block off the evictable list; content stays addressable.
    assert pool.lookup(bytes([0]) * 32) == 0
    pool.touch([0])
    assert pool.ref_count(0) == 1 and pool.evictable_order() == [2, 1]
    # Uncached free blocks go first, then the LRU cached one loses its content (ids ascending).
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.lookup(bytes([2]) * 32) is None and pool.num_evictions == 1
    assert pool.lookup(bytes([1]) * 32) == 1
    pool.check_integrity()
    with pytest.raises(KVCacheIntegrityError, match="caches no content"):
        pool.touch([3])
    with pytest.raises(KVCacheIntegrityError, match="caching free block"):
        pool.free([4])
        pool.cache_block(4, b"x" * 32)
    pool.free([0, 3, 2])
    pool.check_integrity()


def test_pool_integrity_covers_the_hash_map_and_the_evictable_list():
    pool = BlockPool(3)
    (b,) = pool.allocate(1)
    pool.cache_block(b, b"h" * 32)
    pool.free([b])
    pool._cached[b"g" * 32] = b  # a second hash pointing at the block
    with pytest.raises(KVCacheIntegrityError, match="hashes cached"):
        pool.check_integrity()

    pool = BlockPool(3)
    (b,) = pool.allocate(1)
    pool.cache_block(b, b"h" * 32)
    pool.free([b])
    pool._free.add([b])  # on both lists
    with pytest.raises(KVCacheIntegrityError, match="free and evictable"):
        pool.check_integrity()

    pool = BlockPool(3)
    (b,) = pool.allocate(1)
    pool.cache_block(b, b"h" * 32)
    pool._ref_counts[b] = 0  # unreferenced but on no list
    with pytest.raises(KVCacheIntegrityError, match="off the free list"):
        pool.check_integrity()


# ---- the manager ------------------------------------------------------------------------------


def _mgr(block_size: int, blocks: tuple[int, ...], t: int | None = None) -> KVCacheManager:
    return KVCacheManager(
        CacheConfig(block_size, blocks, t, enable_prefix_caching=True, prefix_cache_salt="m")
    )


def _run(m: KVCacheManager, rid: str, tokens: list[int], use_cache: bool = True) -> list[bytes]:
    """Admit `tokens` (taking the cached prefix), compute them all and register the full blocks."""
    hashes: list[bytes] = []
    m.hasher.extend(hashes, tokens)
    hit = m.find_cached_prefix(hashes, len(tokens)) if use_cache else None
    assert m.allocate_slots(rid, len(tokens), hit)
    m.cache_blocks(rid, hashes, len(tokens))
    m.check_integrity()
    return hashes


def test_manager_shares_cached_blocks_with_ref_counts():
    m = _mgr(4, (16,))
    doc = list(range(100, 118))  # 18 tokens: 4 full blocks
    _run(m, "a", doc)
    a_blocks = m.pieces("a")[0].block_ids
    hashes: list[bytes] = []
    m.hasher.extend(hashes, doc[:14] + [1, 2, 3])  # diverges mid-block 3
    hit = m.find_cached_prefix(hashes, 17)
    assert (hit.num_tokens, hit.num_free_blocks) == (12, 0) and hit.pieces == ((0, tuple(a_blocks[:3])),)
    assert m.allocate_slots("b", 17, hit)
    assert m.pieces("b")[0].block_ids[:3] == a_blocks[:3]
    assert [m.pool().ref_count(x) for x in a_blocks] == [2, 2, 2, 1, 1]
    m.check_integrity()
    assert m.prefix_cache_stats.num_query_tokens == 18 + 17 and m.prefix_cache_stats.num_hit_tokens == 12
    m.free("a")
    assert [m.pool().ref_count(x) for x in a_blocks] == [1, 1, 1, 0, 0]
    m.free("b")
    m.check_integrity()
    assert m.usage() == [0.0] and m.num_cached_blocks == 4  # cached but free counts as free
    # A wholly cached prompt still computes its last token: 16 tokens hit 3 blocks, not 4.
    assert m.find_cached_prefix(_hashes(m, doc[:16]), 16).num_tokens == 12
    assert m.find_cached_prefix(_hashes(m, doc[:17]), 17).num_tokens == 16
    # Reversed free order: the deepest block of a is evicted first, keeping the chain's head.
    assert m.pool().evictable_order()[:4] == [a_blocks[3], a_blocks[2], a_blocks[1], a_blocks[0]]
    m.pool().allocate(m.pool().num_free_blocks - 3)  # evicts all but the 3 least deep cached
    assert m.find_cached_prefix(_hashes(m, doc), 18).num_tokens == 12


def _hashes(m: KVCacheManager, tokens: list[int]) -> list[bytes]:
    out: list[bytes] = []
    m.hasher.extend(out, tokens)
    return out


def test_manager_takes_cached_pieces_on_the_groups_that_hold_them():
    """T = 4 tokens per group, B = 2: a 3-group request; a new request with the same prefix
    finds each piece on the group where the first put it, and continues there."""
    m = _mgr(2, (8, 8, 8), t=4)
    assert m.allocate_slots("x", 4)  # x on group 0 (2 blocks): a starts elsewhere
    doc = list(range(50, 61))  # 11 tokens
    _run(m, "a", doc)
    a_groups = [p.group for p in m.pieces("a")]
    assert a_groups == [1, 2, 0]
    hit = m.find_cached_prefix(_hashes(m, doc[:10] + [9, 9]), 12)
    assert hit.num_tokens == 10 and [g for g, _ in hit.pieces] == a_groups
    assert m.allocate_slots("b", 12, hit)
    b = m.pieces("b")
    assert [(p.group, p.token_start, p.token_end) for p in b] == [(1, 0, 4), (2, 4, 8), (0, 8, 12)]
    assert (
        b[2].block_ids[0] == m.pieces("a")[2].block_ids[0]
        and b[2].block_ids[1] != m.pieces("a")[2].block_ids[1]
    )
    m.check_writable("b", 10, 12)
    with pytest.raises(KVCacheIntegrityError, match="overwrite cached"):
        m.check_writable("b", 9, 12)
    m.check_integrity()
    # A hit ending on a group boundary onboards the next piece on the most free unused group.
    hit = m.find_cached_prefix(_hashes(m, doc[:8] + [3, 3, 3]), 11)
    assert hit.num_tokens == 8 and [g for g, _ in hit.pieces] == [1, 2]
    assert m.allocate_slots("c", 11, hit)
    assert [p.group for p in m.pieces("c")] == [1, 2, 0]
    m.check_integrity()
    for rid in ("a", "b", "c", "x"):
        m.free(rid)
    m.check_integrity()
    assert m.usage() == [0.0, 0.0, 0.0]


def test_allocation_with_a_hit_is_all_or_nothing_and_never_evicts_the_hit():
    m = _mgr(4, (5,))
    doc = list(range(30, 42))  # 3 full blocks
    _run(m, "a", doc)
    m.free("a")  # 3 cached (evictable) + 2 free
    hit = m.find_cached_prefix(_hashes(m, doc + [1] * 13), 25)
    assert (hit.num_tokens, hit.num_free_blocks) == (12, 3)
    assert not m.allocate_slots("b", 25, hit)  # needs 4 new blocks, 2 are free besides the hit
    assert not m.has_request("b") and m.pool().num_evictable_blocks == 3
    m.check_integrity()
    assert m.allocate_slots("b", 20, hit)  # 2 new blocks: the free ones, the hit stays
    assert m.pieces("b")[0].block_ids[:3] == list(hit.pieces[0][1])
    m.check_integrity()


# ---- the scheduler ----------------------------------------------------------------------------


def _sched(blocks: tuple[int, ...], t: int | None = None, cache: bool = True, **kw) -> Scheduler:
    cfg = SchedulerConfig(
        max_model_len=kw.pop("max_model_len", 256),
        max_num_batched_tokens=kw.pop("budget", 32),
        chunk_size=kw.pop("chunk", 8),
    )
    cc = CacheConfig(4, blocks, t, enable_prefix_caching=cache, prefix_cache_salt="toy")
    return Scheduler(cfg, KVCacheManager(cc), **kw)


def _req(rid: str, prompt: list[int], max_tokens: int, **sp) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **sp), eos_token_ids=(EOS,))


def _step(s: Scheduler) -> list[Request]:
    out = s.schedule()
    check_step(s, out)
    for c in out.chunks:  # no chunk ever writes below the request's computed prefix
        assert c.start == c.request.num_computed_tokens
        s.kv_manager.check_writable(c.request.request_id, c.start, c.end)
    sampled = {c.request.request_id: toy_token(c.request, c.end) for c in out.chunks if c.sample}
    finished = s.update_from_output(out, sampled).finished
    s.kv_manager.check_integrity()
    return finished


def test_admission_counts_blocks_shared_with_a_running_request():
    """a (16 prompt tokens) holds 4 blocks of 8; b shares those 16 and needs 6 blocks in all:
    without the cache it waits, with it it needs only 2 new and starts at token 16."""
    doc = list(range(60, 76))
    for cache in (False, True):
        s = _sched((8,), cache=cache, budget=64, chunk=64)
        s.add_request(_req("a", doc, max_tokens=10))
        _step(s)
        b = _req("b", doc + [5, 6, 7, 8, 9, 10], max_tokens=2)
        s.add_request(b)
        _step(s)
        assert (s.num_running, b.num_cached_tokens) == ((2, 16) if cache else (1, None))


def test_prompt_logprobs_requests_skip_the_lookup_but_feed_the_cache():
    doc = list(range(60, 80))
    s = _sched((32,))
    first = _req("p", doc, max_tokens=1, prompt_logprobs=1)
    s.add_request(first)
    while s.has_unfinished_requests():
        _step(s)
    second = _req("q", doc + [3], max_tokens=1, prompt_logprobs=0)
    third = _req("r", doc + [3], max_tokens=1)
    s.add_request(second)
    s.add_request(third)
    _step(s)
    assert (first.num_cached_tokens, second.num_cached_tokens, third.num_cached_tokens) == (0, 0, 20)


def test_an_arrival_hashes_its_blocks_only_as_far_as_the_lookup_needs():
    """A 120-block prompt with nothing cached hashes one window of 16 blocks on admission,
    the rest as its chunks complete; one sharing 100 cached blocks still finds all 100
    (windows of 16, 64, 256), and both end with every full block hashed and offered."""
    doc = [3 + (i * 7) % 250 for i in range(480)]  # 120 blocks of 4
    s = _sched((400,), budget=64, chunk=64, max_model_len=1024)
    first = _req("a", doc, max_tokens=1)
    s.add_request(first)
    _step(s)
    assert len(first.block_hashes) == 16  # the first window: block 0 missed
    while s.has_unfinished_requests():
        _step(s)
    assert len(first.block_hashes) == 120
    second = _req("b", doc[:400] + [9] * 80, max_tokens=1)
    s.add_request(second)
    _step(s)
    assert second.num_cached_tokens == 400 and len(second.block_hashes) == 120  # windows 16, 64, 256
    while s.has_unfinished_requests():
        _step(s)
    assert len(second.block_hashes) == 120


@pytest.mark.parametrize("blocks,t", [((12,), None), ((10, 10, 10), 16)])
def test_abort_storm_keeps_ref_counts_hashes_and_outputs(blocks, t):
    """Requests over a few shared documents, diverging at block boundaries and mid-block, under a
    tiny KV budget (preemption, eviction) with random aborts: integrity after every step, no
    leak at the end, and every request that finishes produces what it does without the cache."""
    rng = random.Random(0)
    docs = [[rng.randrange(3, 90) for _ in range(n)] for n in (16, 22, 9)]
    specs = []
    for i in range(40):
        doc = docs[i % 3]
        cut = rng.choice([len(doc), 8, 12, 13, len(doc) - 1])
        specs.append(
            (
                f"r{i}",
                doc[:cut] + [rng.randrange(3, 90) for _ in range(rng.randrange(1, 6))],
                rng.randrange(1, 12),
            )
        )
    results = {}
    for cache in (False, True):
        s = _sched(blocks, t, cache=cache, budget=24, chunk=7)
        reqs = {rid: _req(rid, p, m, ignore_eos=True) for rid, p, m in specs}
        pending = list(reqs.values())
        done: dict[str, list[int]] = {}
        steps = 0
        arng = random.Random(1)
        while pending or s.has_unfinished_requests():
            steps += 1
            assert steps < 2000, "no progress"
            for _ in range(arng.randrange(0, 4)):
                if pending:
                    s.add_request(pending.pop(0))
            if arng.random() < 0.15:  # abort a random live request (waiting or running)
                live = [r for r in reqs.values() if s.get_request(r.request_id) is r]
                if live:
                    victim = arng.choice(live)
                    s.finish_request(victim.request_id, RequestStatus.FINISHED_ABORTED)
                    s.kv_manager.check_integrity()
            for r in _step(s):
                done[r.request_id] = list(r.output_token_ids)
        kv = s.kv_manager
        assert kv.usage() == [0.0] * kv.num_kvp_groups
        kv.check_integrity()
        results[cache] = (done, s.num_preemptions, kv.prefix_cache_stats.num_hit_tokens)
    (plain, _, _), (cached, num_preemptions, num_hits) = results[False], results[True]
    both = plain.keys() & cached.keys()
    assert len(both) > 10 and num_hits > 0 and num_preemptions > 0
    assert all(plain[r] == cached[r] for r in both)


def test_cli_flags_toggle_prefix_caching():
    from mnemosyne.cli import build_parser, engine_args_from

    parser = build_parser()
    for cmd in ("generate", "serve"):
        assert engine_args_from(parser.parse_args([cmd])).enable_prefix_caching
        assert engine_args_from(parser.parse_args([cmd, "--enable-prefix-caching"])).enable_prefix_caching
        assert not engine_args_from(
            parser.parse_args([cmd, "--no-enable-prefix-caching"])
        ).enable_prefix_caching


def test_worker_mirrors_share_cached_blocks_and_write_only_fresh_slots():
    """Plans of two requests sharing cached blocks: each group's mirror holds the shared ids in
    both block tables, the newcomer's first plan sends its cached pieces whole, and its rows
    write only slots of its own fresh blocks (never a cached one)."""
    import torch

    from mnemosyne.engine.step_plan import PlanBuilder
    from mnemosyne.worker.block_table import BlockTableMirror
    from mnemosyne.worker.sub_batch import build_sub_batch

    s = _sched((12, 12), t=8, budget=64, chunk=64)
    planner = PlanBuilder(s, s.kv_manager)
    mirrors = [BlockTableMirror(g, 12) for g in range(2)]
    doc = list(range(40, 52))  # 12 tokens: pieces [0, 8) and [8, 12) on the two groups

    def run_step():
        sched = s.schedule()
        plan = planner.build(sched)
        batches = [build_sub_batch(plan, m, 4, torch.device("cpu")) for m in mirrors]
        s.update_from_output(sched, {c.request.request_id: 7 for c in sched.chunks if c.sample})
        s.kv_manager.check_integrity()
        return plan, batches

    s.add_request(_req("a", doc, max_tokens=4, ignore_eos=True))
    run_step()
    run_step()  # a's second piece: its 12 prompt tokens are computed and cached
    s.add_request(_req("b", doc + [1, 2, 3], max_tokens=1, ignore_eos=True))
    plan, batches = run_step()
    b_chunk = next(c for c in plan.chunks if c.request_id == "b")
    assert (b_chunk.start, b_chunk.num_tokens) == (12, 3)  # 12 cached tokens (3 blocks)
    assert [(p.token_start, p.num_known_blocks, len(p.new_block_ids)) for p in b_chunk.pieces] == [
        (0, 0, 2),
        (8, 0, 2),
    ]
    kv = s.kv_manager
    for g, (mirror, batch) in enumerate(zip(mirrors, batches, strict=True)):
        a_ids, b_ids = mirror.get("a").block_ids, mirror.get("b").block_ids
        shared = 2 if g == 0 else 1
        assert b_ids[:shared] == a_ids[:shared] and kv.pool(g).block_hash(a_ids[0]) is not None
        row = batch.row_starts[[c.request_id for c in batch.chunks].index("b")]
        slots = batch.meta.slot_mapping[row : row + 3].tolist()
        if g == b_chunk.owner_group:
            assert {x // 4 for x in slots} == {b_ids[-1]} and kv.pool(g).block_hash(b_ids[-1]) is None
        else:
            assert slots == [-1, -1, -1]
