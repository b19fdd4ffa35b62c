"""The page-aligned (TMA) split-KV chunk kernel (kernels/chunk_tma_attention.py) against
TorchReferenceBackend, through test_kernel_prefill's `run_case` (shuffled blocks, NaN in
unused cache slots, poisoned outputs and workspace): single-page steps (block_n dividing
the block size) and multi-page steps (block_n = 2 .. 4 pages, one score tile per page).

On CPU the Triton interpreter runs both load paths of the same kernel body: TMA
descriptors (the interpreter emulates descriptor loads) and pointer loads. The `gpu`
cases run the descriptor path natively on sm_90+.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
from test_kernel_prefill import DEVICE, MIXED, SPLIT_SEQS, Seq, boundary_seqs, prefill, run_case

from mnemosyne.kernels.chunk_splitkv_attention import chunk_splitkv_attention, tile_launch
from mnemosyne.kernels.chunk_tma_attention import chunk_tma_attention, tma_supported
from mnemosyne.kernels.chunk_tma_launch import (
    default_tma_block_n,
    step_boxes,
    tma_tile_launch,
)
from mnemosyne.kernels.paged_prefill import default_block_q, plan_query_tiles

LOAD_PATHS = pytest.mark.parametrize("use_tma", [True, False], ids=["tma", "ptr"])


def run_tma(*args: object, use_tma: bool | None = None, **kw: object) -> None:
    kernel = functools.partial(chunk_tma_attention, use_tma=use_tma)
    run_case(*args, kernel=kernel, **kw)  # type: ignore[arg-type]


# (num_heads, num_kv_heads, head_dim, block_size, dtype, sliding_window)
CONFIGS = [
    (2, 2, 64, 16, torch.float32, None),  # GQA 1
    (8, 2, 64, 32, torch.float32, 7),  # GQA 4, window
    (8, 1, 128, 16, torch.bfloat16, None),  # GQA 8
    (4, 4, 64, 16, torch.float16, 3),
    (6, 2, 64, 16, torch.float32, 5),  # GQA 3: M padded to a power of two
]


@LOAD_PATHS
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "h{}kv{}d{}b{}-{}-w{}".format(*c))
def test_mixed_batch(config, use_tma):
    num_heads, num_kv_heads, head_dim, block_size, dtype, window = config
    run_tma(MIXED, num_heads, num_kv_heads, head_dim, block_size, dtype, window, use_tma=use_tma)


def test_head_dim_80_falls_back_to_pointer_loads():
    # GQA ratio 3 (M padded), head dim 80 (padded to 128): pointer loads of the same tiles.
    assert not tma_supported(80, torch.device(DEVICE))
    run_tma(MIXED, 6, 2, 80, 16, torch.float32, 5, seed=11)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        run_tma(MIXED, 6, 2, 80, 16, torch.float32, 5, use_tma=True)


@LOAD_PATHS
@pytest.mark.parametrize("block_size,block_n", [(16, 16), (32, 16), (64, 32)])
def test_block_boundaries(block_size, block_n, use_tma):
    seqs = boundary_seqs(block_size)
    run_case_args = (seqs, 4, 2, 64, block_size, torch.float32, None)
    run_tma(*run_case_args, block_q=5, block_n=block_n, seed=block_size, use_tma=use_tma)


@LOAD_PATHS
@pytest.mark.parametrize("window", [None, 40, 2, 17])
def test_long_kv_masked_and_unmasked_steps(window, use_tma):
    # Each tile walks a masked window edge (lo aligned down to BLOCK_N), fully visible steps
    # and a masked diagonal; kv_start > 0 in the second sequence.
    seqs = [prefill(20, 60), Seq(9, 90, 13, 70), prefill(1, 99)]
    run_tma(seqs, 4, 2, 64, 16, torch.float32, window, block_q=4, block_n=16, seed=3, use_tma=use_tma)


def test_subset_of_sequences_covered():
    run_tma(MIXED, 4, 1, 64, 16, torch.float32, None, covered=[0, 2, 4, 6], seed=1)
    run_tma(MIXED, 4, 1, 64, 16, torch.bfloat16, 6, covered=[1, 5], seed=2, use_tma=False)


# (num_heads, num_kv_heads, head_dim, block_size, dtype, window, num_splits)
SPLIT_CONFIGS = [
    (2, 2, 64, 16, torch.float32, None, 3),  # GQA 1
    (8, 2, 128, 32, torch.float32, None, 7),  # GQA 4
    (8, 1, 128, 16, torch.bfloat16, None, 2),  # GQA 8
    (8, 2, 64, 16, torch.float32, 50, 4),  # sliding window
]


@pytest.mark.parametrize("config", SPLIT_CONFIGS, ids=lambda c: "h{}kv{}d{}b{}-{}-w{}-s{}".format(*c))
def test_split_kv_matches_reference(config):
    num_heads, num_kv_heads, head_dim, block_size, dtype, window, num_splits = config
    run_tma(SPLIT_SEQS, num_heads, num_kv_heads, head_dim, block_size, dtype, window,
            block_q=None, block_n=16, num_splits=num_splits, seed=7)  # fmt: skip


@pytest.mark.parametrize("num_splits", [1, 3, 64])  # 64: more splits than steps, empty splits
def test_split_kv_long_chunk(num_splits):
    seqs = {1: [prefill(300, 37)], 3: [prefill(60, 301)], 64: [prefill(2, 150), Seq(4, 300, 50, 200)]}[
        num_splits
    ]
    run_tma(seqs, 4, 1, 64, 16, torch.float32, None, block_q=None, block_n=16, num_splits=num_splits, seed=9)


@pytest.mark.parametrize("seed", range(4))
def test_random_chunks_over_odd_prefixes(seed):
    # Fresh random batches: chunks of 1 .. 300 queries after odd prefixes, some KVP pieces
    # (kv_start > 0), random GQA / window / split count / load path.
    rng = random.Random(seed)
    seqs = []
    for _ in range(rng.randint(1, 3)):
        c = rng.choice([1, 2, rng.randint(3, 40), rng.randint(41, 300)])
        prefix = rng.randrange(1, 400, 2)
        if rng.random() < 0.3:  # a KVP piece: keys [kv_start, kv_start + kv_len) held here
            kv_start = rng.randint(1, prefix)
            seqs.append(Seq(c, prefix, prefix + c - kv_start, kv_start))
        else:
            seqs.append(prefill(c, prefix))
    num_kv_heads = rng.choice([1, 2])
    num_heads = num_kv_heads * rng.choice([1, 4, 8])
    window = rng.choice([None, None, rng.randint(1, 200)])
    run_tma(seqs, num_heads, num_kv_heads, 64, rng.choice([16, 32]), torch.float32, window,
            block_q=None, block_n=16, num_splits=rng.choice([1, 2, 5, 33]), seed=seed,
            use_tma=rng.random() < 0.5)  # fmt: skip


# Multi-page steps: odd chunk and prefix lengths, a decode-like query, KVP pieces (kv_start > 0:
# all keys before the queries, and the queries inside the held range), a prefix shorter than a step.
MULTI_PAGE_SEQS = [prefill(19, 51), Seq(9, 90, 13, 70), prefill(1, 99), Seq(6, 130, 41, 95), prefill(21, 3)]
# (block_size, block_n, num_heads, num_kv_heads, head_dim, dtype, window, num_splits, block_q, use_tma)
MULTI_PAGE_CONFIGS = [
    (16, 32, 4, 4, 64, torch.float32, None, 1, 5, True),  # GQA 1, 2 pages
    (16, 48, 8, 2, 64, torch.float32, 19, 3, None, False),  # GQA 4, 3 pages, window, 3 splits
    (16, 64, 8, 1, 128, torch.bfloat16, None, 2, None, True),  # GQA 8, 4 pages, head dim 128
    (32, 64, 8, 2, 128, torch.float32, 45, 1, 3, True),  # 2 pages of 32, window
    (32, 128, 8, 1, 64, torch.float16, 7, 5, None, False),  # 4 pages of 32, window, 5 splits
    (64, None, 8, 2, 64, torch.bfloat16, None, 4, None, True),  # the head-dim-64 default: 2 pages
]


@pytest.mark.parametrize(
    "config", MULTI_PAGE_CONFIGS, ids=lambda c: "b{}n{}-h{}kv{}d{}-{}-w{}-s{}-q{}-tma{}".format(*c)
)
def test_multi_page_steps(config):
    block_size, block_n, num_heads, num_kv_heads, head_dim, dtype, window, splits, block_q, use_tma = config
    if block_n is None:  # the default takes two 64-key pages per step at head dim 64 (16-bit)
        assert default_tma_block_n(block_size, dtype, head_dim) == 2 * block_size
        block_q = default_block_q(num_heads // num_kv_heads, dtype)
    run_tma(MULTI_PAGE_SEQS, num_heads, num_kv_heads, head_dim, block_size, dtype, window,
            block_q=block_q, block_n=block_n, num_splits=splits, seed=block_size, use_tma=use_tma)  # fmt: skip


def poisoned_pages_kernel(seqs: list[Seq], block_size: int, window: int | None, use_tma: bool):
    """chunk_tma_attention on a copy of the block table in which every entry no tile needs
    (pages wholly before the sequence's first window, padding past its last page, and four
    extra columns) names a NaN-filled block: a masked multi-page step that looked one of them
    up and used its K or V rows would put NaN into the output. Also pads the tile list and the
    merge rows with -1 entries (a CUDA graph's fixed grid), which must do nothing."""

    def kernel(*args: object, **kw: object) -> None:
        args_l = list(args)
        k_cache, table = args_l[1], args_l[7]
        assert isinstance(k_cache, torch.Tensor) and isinstance(table, torch.Tensor)
        nan_block = int(torch.isnan(k_cache.flatten(1)).all(1).nonzero()[0])
        poisoned = torch.full(
            (table.shape[0], table.shape[1] + 4), nan_block, dtype=table.dtype, device=DEVICE
        )
        for i, s in enumerate(seqs):
            first = 0 if window is None else max(s.q_pos - s.kv_start - window + 1, 0) // block_size
            last = -(-s.kv_len // block_size)
            poisoned[i, first:last] = table[i, first:last]
        args_l[7] = poisoned
        pad = torch.full((2,), -1, dtype=torch.int32, device=DEVICE)
        args_l[8] = torch.cat([pad[:1], args_l[8], pad])  # type: ignore[list-item]
        args_l[9] = torch.cat([pad[:1] * 0, args_l[9], pad * 0])  # type: ignore[list-item]
        kw["merge_rows"] = torch.cat([kw["merge_rows"], pad])  # type: ignore[list-item]
        chunk_tma_attention(*args_l, use_tma=use_tma, **kw)  # type: ignore[arg-type]

    return kernel


@pytest.mark.parametrize("window,num_splits,use_tma", [(40, 1, True), (23, 3, False), (None, 2, False)])
def test_multi_page_steps_never_use_pages_they_do_not_need(window, num_splits, use_tma):
    seqs = [prefill(5, 200), Seq(7, 150, 90, 66), prefill(3, 17)]
    kernel = poisoned_pages_kernel(seqs, 16, window, use_tma)
    run_case(seqs, 4, 2, 64, 16, torch.float32, window, block_q=4, block_n=64, num_splits=num_splits,
             seed=5, kernel=kernel)  # fmt: skip


def test_launch_defaults_follow_the_sweep():
    bf16, fp32 = torch.bfloat16, torch.float32
    # head dim 64 (16-bit): 128-key steps, one page or two 64-key pages; else as before
    assert [default_tma_block_n(p, bf16, 64) for p in (64, 128, 256, 192, 32, 16)] == [
        128,
        128,
        128,
        64,
        32,
        16,
    ]
    assert [default_tma_block_n(p, bf16, 128) for p in (64, 128, 256, 32, 16)] == [64, 64, 64, 32, 16]
    assert [default_tma_block_n(p, fp32, 64) for p in (32, 64, 16)] == [32, 32, 16]
    assert step_boxes(128, 64) == (64, 2) and step_boxes(64, 128) == (64, 1) and step_boxes(48, 16) == (16, 3)
    q64 = torch.empty(1, 32, 64, dtype=bf16)
    assert tma_tile_launch(q64, 4, 16, 128, None, None) == (16, 64, 64, 4, 4)
    assert tma_tile_launch(q64, 4, 32, 128, None, None) == (32, 128, 64, 4, 3)
    assert tma_tile_launch(q64, 4, 32, 64, None, None) == (32, 128, 64, 8, 3)
    assert tma_tile_launch(q64, 4, 32, 64, 4, 2) == (32, 128, 64, 4, 2)  # explicit options win
    q128 = torch.empty(1, 32, 128, dtype=bf16)
    assert tma_tile_launch(q128, 4, 32, 64, None, None) == tile_launch(q128, 4, 32, None, None)


def test_rejects_caches_it_cannot_serve():
    with pytest.raises(ValueError, match="dividing the cache's block_size"):
        run_tma([prefill(3, 20)], 2, 1, 64, 5, torch.float32, None, block_n=16)
    for block_size, block_n in [(16, 24), (16, 80), (48, 96), (8, 16), (32, 16 * 3)]:
        with pytest.raises(ValueError, match="whole pages"):  # not 2 .. 4 pages of a power of two >= 16
            run_tma([prefill(3, 20)], 2, 1, 64, block_size, torch.float32, None, block_n=block_n)
    q = torch.zeros(2, 2, 64, device=DEVICE)
    cache = torch.zeros(1, 16, 2, 2, 64, device=DEVICE)[:, :, :, 0]  # not contiguous
    ids = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        chunk_tma_attention(
            q, cache, cache, ids, ids.long(), ids.long(), ids, ids[None], ids, ids, q.clone(),
            torch.zeros(2, 2, device=DEVICE), 1.0, None,
        )  # fmt: skip


needs_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs sm_90+"
)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("block_size,block_n", [(64, 64), (128, 128), (128, 64)])
@pytest.mark.parametrize("num_splits", [1, 16])
def test_large_gpu_tma(block_size, block_n, num_splits):
    seqs = [prefill(300, 60001), Seq(32, 90000, 40000, 30000), prefill(7, 20000), prefill(1, 777)]
    run_tma(seqs, 32, 8, 128, block_size, torch.bfloat16, None, block_q=None, block_n=block_n,
            num_splits=num_splits, atol=2e-2, use_tma=True)  # fmt: skip


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("block_size,block_n", [(64, 128), (64, None), (128, 128), (32, 128)])
@pytest.mark.parametrize("num_splits", [1, 16])
def test_large_gpu_tma_head_dim_64(block_size, block_n, num_splits):
    # The Llama-3.2-1B heads (32 / 8, head dim 64): multi-page steps at block sizes 64 and 32,
    # M tiles of 64 rows (the tiles its defaults are measured with); a window on the split runs.
    seqs = [prefill(300, 60001), Seq(32, 90000, 40000, 30000), prefill(7, 20000), prefill(1, 777)]
    window = 5000 if num_splits > 1 else None
    run_tma(seqs, 32, 8, 64, block_size, torch.bfloat16, window, block_q=default_block_q(4, torch.bfloat16),
            block_n=block_n, num_splits=num_splits, atol=2e-2, use_tma=True)  # fmt: skip


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 4096])
def test_large_gpu_tma_window_and_dtypes(dtype, window):
    seqs = [Seq(4000, 16000, 20000), Seq(1000, 19000, 20000), prefill(2500), prefill(1, 20000)]
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    run_tma(seqs, 32, 8, 128, 64, dtype, window, block_q=None, block_n=None, atol=atol, use_tma=True)


@pytest.mark.gpu
@needs_hopper
def test_cuda_graph_replay_tma():
    """Captured once (TMA descriptors, 8 splits + merge), replayed with new positions and
    lengths: they are read on device. Checked against the split-KV kernel run eagerly."""
    c, h, hkv, d, page, nb, splits = 48, 32, 8, 128, 64, 200, 8
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(nb, page, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(nb, page, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(c, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    bt = torch.randperm(nb, device="cuda", generator=gen).to(torch.int32)[None]
    qsl = torch.tensor([0, c], dtype=torch.int32, device="cuda")
    q_pos, kv_start = torch.tensor([5000], device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda")
    kv_lens = torch.tensor([5000 + c], dtype=torch.int32, device="cuda")
    block_q = default_block_q(h // hkv, torch.bfloat16)
    ts, to = (torch.tensor(x, dtype=torch.int32, device="cuda") for x in plan_query_tiles([c], [0], block_q))
    rows = torch.arange(c, dtype=torch.int32, device="cuda")
    ws = (torch.empty(c, h, splits, d, device="cuda"), torch.empty(c, h, splits, device="cuda"))

    def call(kernel, out: torch.Tensor, lse: torch.Tensor, **kw: object) -> None:
        kernel(q, k, v, qsl, q_pos, kv_start, kv_lens, bt, ts, to, out, lse, d**-0.5, None,
               num_splits=splits, merge_rows=rows, block_q=block_q, **kw)  # fmt: skip

    out, lse = torch.empty_like(q), torch.empty(c, h, device="cuda")
    call(chunk_tma_attention, out, lse, workspace=ws, use_tma=True)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(chunk_tma_attention, out, lse, workspace=ws, use_tma=True)
    for pos, start in [(9000, 0), (12000, 3000), (70, 0)]:
        q_pos.fill_(pos)
        kv_start.fill_(start)
        kv_lens.fill_(pos + c - start)
        out.fill_(float("nan"))
        graph.replay()
        ref_out, ref_lse = torch.empty_like(q), torch.empty(c, h, device="cuda")
        call(chunk_splitkv_attention, ref_out, ref_lse)
        torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=2e-2)
