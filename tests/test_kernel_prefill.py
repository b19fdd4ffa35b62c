"""The Triton split-KV chunk attention kernel (kernels/chunk_splitkv_attention.py) against
TorchReferenceBackend, with one split (direct) and many (merged through the LSE).

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1, set below when there is
no GPU) and natively on a CUDA device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mnemosyne.kernels.chunk_splitkv_attention import (  # noqa: E402
    choose_chunk_splits,
    chunk_splitkv_attention,
)
from mnemosyne.kernels.paged_prefill import default_block_q, plan_query_tiles  # noqa: E402
from mnemosyne.layers.attention import AttentionMetadata, TorchReferenceBackend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_POISON = float("nan")
LSE_POISON = 1e4


@dataclass
class Seq:
    query_len: int
    q_pos: int  # global position of the first query
    kv_len: int  # keys held here
    kv_start: int = 0  # global position of the first key held here


def prefill(query_len: int, q_pos: int = 0) -> Seq:
    """A chunk of a single-device prefill: keys 0 .. q_pos + query_len - 1."""
    return Seq(query_len, q_pos, q_pos + query_len)


# A mixed batch: odd lengths, a decode-like query over longer KV, a sequence with no key
# held here, KVP pieces with kv_start > 0 (all keys before the queries, and the queries
# inside the held range), a sequence with no queries.
MIXED = [
    prefill(7),
    prefill(1, 36),
    Seq(3, 40, 0, 40),
    prefill(0, 9),
    Seq(5, 40, 20, 16),
    Seq(6, 30, 16, 20),
    prefill(11, 19),
]


def boundary_seqs(block_size: int) -> list[Seq]:
    """Query and KV lengths of B-1, B and B+1 (and their chunked variants)."""
    out = []
    for n in (block_size - 1, block_size, block_size + 1):
        if n > 0:
            out += [prefill(n), prefill(n, block_size), prefill(1, n)]
    return out


def run_case(
    seqs: list[Seq],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    sliding_window: int | None,
    covered: list[int] | None = None,
    block_q: int | None = 4,
    block_n: int | None = 16,
    seed: int = 0,
    atol: float | None = None,
    strided_query: bool = False,
    num_splits: int = 1,
    kernel: Callable[..., None] | None = None,  # None: chunk_splitkv_attention
    **kernel_options: object,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    query_lens = [s.query_len for s in seqs]
    num_tokens = sum(query_lens)
    # Each sequence's held keys in a shuffled set of blocks; unused cache slots are NaN.
    blocks_per_seq = [-(-s.kv_len // block_size) for s in seqs]
    num_blocks = sum(blocks_per_seq) + 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables, k0 = [], 0
    for n in blocks_per_seq:
        block_tables.append(perm[k0 : k0 + n])
        k0 += n
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    for s, blocks in zip(seqs, block_tables):
        j = torch.arange(s.kv_len)
        slots = torch.tensor(blocks, dtype=torch.long)[j // block_size] * block_size + j % block_size
        for cache in (k_cache, v_cache):
            held = torch.randn(s.kv_len, num_kv_heads, head_dim, generator=gen)
            cache.view(-1, num_kv_heads, head_dim)[slots] = held.to(dtype)
    query = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    if strided_query:  # a view with a row stride wider than num_heads * head_dim (as in a qkv split)
        query = torch.cat([query, torch.zeros_like(query)], dim=1)[:, :num_heads]
    query, k_cache, v_cache = query.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE)

    meta = AttentionMetadata.build(
        query_lens,
        [s.q_pos for s in seqs],
        [s.kv_start for s in seqs],
        [s.kv_len for s in seqs],
        block_tables,
        [-1] * num_tokens,
        DEVICE,
    )
    scale = 1.0 / math.sqrt(head_dim)
    # float32 reference of the same (possibly bf16) inputs
    ref_out, ref_lse = TorchReferenceBackend().forward(
        query.float(), k_cache.float(), v_cache.float(), meta, scale, sliding_window
    )

    covered = list(range(len(seqs))) if covered is None else covered
    plan_q = default_block_q(num_heads // num_kv_heads, dtype) if block_q is None else block_q
    tile_seq, tile_q_offset = plan_query_tiles(query_lens, covered, plan_q)
    out = torch.full(query.shape, OUT_POISON, dtype=dtype, device=DEVICE)
    lse = torch.full((num_tokens, num_heads), LSE_POISON, dtype=torch.float32, device=DEVICE)
    rows = torch.zeros(num_tokens, dtype=torch.bool)
    qsl = meta.query_start_loc.tolist()
    for i in covered:
        rows[qsl[i] : qsl[i + 1]] = True
    merge_rows = rows.nonzero().flatten().to(torch.int32).to(DEVICE)
    workspace = None
    if num_splits > 1:  # poisoned: rows no split writes must never be read
        workspace = (
            torch.full((num_tokens, num_heads, num_splits, head_dim), float("nan"), device=DEVICE),
            torch.full((num_tokens, num_heads, num_splits), float("nan"), device=DEVICE),
        )
    (kernel or chunk_splitkv_attention)(
        query, k_cache, v_cache,
        meta.query_start_loc, meta.q_pos_start, meta.kv_start, meta.kv_lens, meta.block_tables,
        torch.tensor(tile_seq, dtype=torch.int32, device=DEVICE),
        torch.tensor(tile_q_offset, dtype=torch.int32, device=DEVICE),
        out, lse, scale, sliding_window, num_splits=num_splits, merge_rows=merge_rows,
        block_q=block_q, block_n=block_n, workspace=workspace, **kernel_options,
    )  # fmt: skip
    rows = rows.to(DEVICE)
    # Rows of uncovered sequences are untouched.
    assert torch.isnan(out[~rows]).all()
    assert (lse[~rows] == LSE_POISON).all()
    # Covered rows: no NaN; -inf LSE (and zero output) exactly where the reference has it.
    out_c, lse_c = out[rows].float(), lse[rows]
    ref_out_c, ref_lse_c = ref_out[rows], ref_lse[rows]
    assert torch.isfinite(out_c).all()
    assert torch.equal(torch.isneginf(lse_c), torch.isneginf(ref_lse_c))
    assert not torch.isnan(lse_c).any() and not torch.isposinf(lse_c).any()
    assert (out_c[torch.isneginf(lse_c)] == 0).all()
    if atol is None:
        atol = 1e-5 if dtype == torch.float32 else 2e-2  # 16-bit: vs the float32 reference
    finite = torch.isfinite(ref_lse_c)
    torch.testing.assert_close(lse_c[finite], ref_lse_c[finite], atol=atol, rtol=atol)
    torch.testing.assert_close(out_c, ref_out_c, atol=atol, rtol=atol)


def test_plan_query_tiles():
    seq, off = plan_query_tiles([5, 0, 8, 1, 4], [0, 1, 2, 4], 4)
    assert sorted(zip(seq, off)) == [(0, 0), (0, 4), (2, 0), (2, 4), (4, 0)]
    assert plan_query_tiles([3, 2], [], 4) == ([], [])
    assert plan_query_tiles([3, 2], [1], 1) == ([1, 1], [1, 0])


# (num_heads, num_kv_heads, head_dim, block_size, dtype, sliding_window)
CONFIGS = [
    (2, 2, 16, 16, torch.float32, None),
    (8, 2, 64, 5, torch.float32, 7),
    (8, 1, 128, 1, torch.bfloat16, None),
    (6, 2, 80, 16, torch.float32, 5),  # GQA ratio 3, padded head_dim
    (4, 2, 32, 5, torch.bfloat16, 9),
    (4, 4, 64, 16, torch.float16, 3),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "h{}kv{}d{}b{}-{}-w{}".format(*c))
def test_mixed_batch(config):
    num_heads, num_kv_heads, head_dim, block_size, dtype, window = config
    run_case(MIXED, num_heads, num_kv_heads, head_dim, block_size, dtype, window)


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_block_boundaries(block_size):
    seqs = boundary_seqs(block_size)
    run_case(seqs, 4, 2, 16, block_size, torch.float32, None, block_q=5, seed=block_size)


def test_subset_of_sequences_covered():
    # Only some sequences get tiles: the others' rows must stay untouched.
    run_case(MIXED, 4, 1, 32, 5, torch.float32, None, covered=[0, 2, 4, 6], seed=1)
    run_case(MIXED, 4, 1, 32, 5, torch.bfloat16, 6, covered=[1, 5], seed=2)


@pytest.mark.parametrize("window", [None, 40, 2])
def test_long_kv_masked_and_unmasked_steps(window):
    # Long KV: each tile walks a masked window edge, fully visible steps and a masked diagonal.
    seqs = [prefill(20, 60), Seq(9, 90, 13, 70), prefill(1, 99)]
    run_case(seqs, 4, 2, 16, 16, torch.float32, window, block_q=4, block_n=16, seed=3)


def test_default_tunables():
    run_case(MIXED, 8, 2, 64, 16, torch.float32, None, block_q=None, block_n=None, seed=4, strided_query=True)
    run_case(MIXED, 4, 4, 16, 5, torch.bfloat16, 4, block_q=None, block_n=None, seed=5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 4096])
def test_large_gpu(dtype, window):
    seqs = [Seq(4000, 16000, 20000), Seq(1000, 19000, 20000), prefill(2500), prefill(1, 20000)]
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    run_case(seqs, 32, 8, 128, 16, dtype, window, block_q=None, block_n=None, atol=atol)


# ---- split-KV: the keys of each tile cut into num_splits pieces, merged through the LSE ----

# Chunks of 1 .. 300 queries over odd prefixes (shuffled blocks), KVP pieces with kv_start > 0
# (all keys before the queries; the queries inside the held range), a decode-like query.
SPLIT_SEQS = [
    prefill(1, 203),
    prefill(3, 301),
    Seq(16, 515, 180, 337),  # an older KVP piece: keys [337, 517) all before the queries
    Seq(13, 260, 274, 99),  # a newer KVP piece: keys [99, 373), own keys included
]

# (num_heads, num_kv_heads, head_dim, block_size, dtype, window, num_splits)
SPLIT_CONFIGS = [
    (2, 2, 64, 16, torch.float32, None, 3),  # GQA 1
    (8, 2, 80, 5, torch.float32, None, 7),  # GQA 4, padded head dim, odd block size
    (8, 1, 128, 16, torch.bfloat16, None, 2),  # GQA 8
    (8, 2, 64, 16, torch.float32, 50, 4),  # sliding window
]


@pytest.mark.parametrize("config", SPLIT_CONFIGS, ids=lambda c: "h{}kv{}d{}b{}-{}-w{}-s{}".format(*c))
def test_split_kv_matches_reference(config):
    num_heads, num_kv_heads, head_dim, block_size, dtype, window, num_splits = config
    run_case(SPLIT_SEQS, num_heads, num_kv_heads, head_dim, block_size, dtype, window,
             block_q=None, block_n=32, num_splits=num_splits, seed=7)  # fmt: skip


@pytest.mark.parametrize("num_splits", [3, 64])  # 64: more splits than steps, empty splits
def test_split_kv_long_chunk(num_splits):
    seqs = [prefill(300, 37)] if num_splits == 3 else [prefill(2, 150), Seq(4, 300, 50, 200)]
    run_case(seqs, 4, 1, 64, 16, torch.float32, None, block_q=None, block_n=32, num_splits=num_splits, seed=9)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_split_kv_block_boundaries_and_subsets(num_splits):
    # Split edges at block and step boundaries; uncovered sequences' rows stay poisoned.
    seqs = boundary_seqs(16) + [prefill(5, 64), prefill(1, 127)]
    covered = list(range(0, len(seqs), 2))
    run_case(seqs, 4, 2, 64, 16, torch.float32, None, covered=covered, block_q=3, block_n=16,
             num_splits=num_splits, seed=num_splits)  # fmt: skip


def test_choose_chunk_splits():
    # Few programs: split until about 4 per SM, no split shorter than 1024 keys.
    assert choose_chunk_splits(1, 8, 1 << 17, 132) == 66
    assert choose_chunk_splits(1, 8, 4096, 132) == 4
    assert choose_chunk_splits(1, 8, 1000, 132) == 1
    assert choose_chunk_splits(132, 8, 1 << 20, 132) == 1  # the tiles fill the GPU
    assert choose_chunk_splits(1, 1, 1 << 24, 132) == 128  # capped


def test_chunk_splits_balance_a_long_prefix_among_short_tiles():
    # 73 tiles of a 2340-token prompt (3364 keys) beside 2 tiles of a chunk after 408K keys
    tiles, long_keys = 75, 408_128
    tile_keys = 73 * 3364 + 2 * long_keys
    assert choose_chunk_splits(tiles, 8, long_keys, 132, waves=8) == 2  # by the tile count alone
    balanced = choose_chunk_splits(tiles, 8, long_keys, 132, waves=8, max_splits=64, tile_keys=tile_keys)
    per_program = -(-tile_keys * 8 // (8 * 132))  # keys of the launch's average program
    assert -(-long_keys // balanced) <= per_program  # no long program walks more than the average
    assert choose_chunk_splits(tiles, 8, long_keys, 132, waves=8, max_splits=32, tile_keys=tile_keys) == 32  # capped
    # uniform tiles: as before
    for num_tiles, keys in ((1, 1 << 17), (4, 300_000), (40, 50_000), (132, 1 << 20)):
        assert choose_chunk_splits(num_tiles, 8, keys, 132, tile_keys=num_tiles * keys) == choose_chunk_splits(
            num_tiles, 8, keys, 132
        )


def test_split_needs_merge_rows():
    q = torch.zeros(2, 2, 16, device=DEVICE)
    cache = torch.zeros(1, 16, 2, 16, device=DEVICE)
    ids = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="merge_rows"):
        chunk_splitkv_attention(
            q, cache, cache, ids, ids.long(), ids.long(), ids, ids[None], ids, ids, q.clone(),
            torch.zeros(2, 2, device=DEVICE), 1.0, None, num_splits=2,
        )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_splits", [1, 16, 100])
@pytest.mark.parametrize("chunk", [1, 32, 300])
def test_split_kv_large_gpu(num_splits, chunk):
    seqs = [prefill(chunk, 60001), Seq(chunk, 90000, 40000, 30000), prefill(7, 20000)]
    run_case(seqs, 32, 8, 128, 16, torch.bfloat16, None, block_q=None, block_n=None,
             num_splits=num_splits, atol=2e-2)  # fmt: skip
