"""Hopper-oriented split-KV attention of prefill chunks: page-aligned K/V tiles loaded by TMA.

The same semantics, tiles, split workspace and exact LSE merge as
`chunk_splitkv_attention` (read its docstring for the tile / M-packing / split invariants);
this variant differs only in how a program walks its keys. Every BLOCK_N-key step is made
of NUM_BOXES whole runs of BOX rows, each run inside one page (one TMA box each for K and V):

    single-page steps: BLOCK_N divides PAGE           BOX = BLOCK_N, NUM_BOXES = 1
    multi-page steps:  BLOCK_N = NUM_BOXES x PAGE      BOX = PAGE,    NUM_BOXES = 2 .. 4
                       (PAGE a power of two >= 16; the pages need not be adjacent)

and the walk is aligned to BLOCK_N in local key coordinates::

    local key j (0 <= j < kv_len):  page(j) = block_tables[s, j // PAGE],  row = page(j) * PAGE + j % PAGE
    step i covers local keys [n0, n0 + BLOCK_N),  n0 = lo + i * BLOCK_N,  lo = floor(lo' / BLOCK_N) * BLOCK_N
            (lo' = first key the tile's window can see; keys in [lo, lo') are masked by the window test)
    box b (0 <= b < NUM_BOXES) of step i covers keys [b0, b0 + BOX),  b0 = n0 + b * BOX
            (b0 % BOX == 0 and BOX <= PAGE, so the box lies in page(b0))
    its K tile = rows [page(b0) * PAGE + b0 % PAGE, + BOX) x columns [kv_head * D, + D)
            of the cache viewed as 2-D [num_blocks * PAGE, num_kv_heads * D]  (one page lookup per box)

    step:   0 ... i_a ............................. i_b ......... n_steps
            | masked head |   fully visible, unmasked   | masked tail (causal / past kv_len)

    one step: S_b = Q K_b^T for every box (NUM_BOXES score tiles [BLOCK_M, BOX]), one running
    max m over all of them, one rescale of (acc, l) by exp2(m_old - m), then acc += P_b V_b
    for every box: the online-softmax bookkeeping is paid once per BLOCK_N keys.

A masked step's tile may run past kv_len into unwritten slots of its page (any bits, NaN
included): scores there are replaced by -inf and the V rows by 0 before the P @ V product.
A masked multi-page step may hold boxes with no key in [lo', kv_len) (pages past the end of
the sequence, whose block-table entries may not exist, or wholly before the window): their
page is never looked up (page 0 is read instead) and their scores and V rows are masked.
Unmasked steps lie inside [lo', kv_len), so every box's page exists.

Hopper features (Triton 3.6, sm_90):
  - TMA: K/V tiles through host-side `triton.tools.tensor_descriptor.TensorDescriptor`s
    (passed as kernel parameters: no device allocator, graph-capturable). Triton lowers
    descriptor loads to cp.async.bulk.tensor on sm_90 (`add_tma_lowering`); before sm_90 it
    rewrites them to pointer loads. USE_TMA=False runs the same body with equivalent
    pointer loads of the same contiguous tiles (head dims that are not a power of two,
    e.g. 80, always take it: a D-wide box would read the next head's columns).
  - Software pipelining by the launch's num_stages (Triton's pipeliner multi-buffers the
    descriptor loads of each loop in shared memory, the unmasked middle loop being the
    one that matters); wgmma where Triton's accelerate-matmul pass picks it for tl.dot on
    sm_90 (the benchmark records whether the PTX holds `wgmma`).
  - No warp specialization: `tl.range(..., warp_specialize=True)` on the middle loop did
    not compile with 4 warps and was not applied with 8 (Triton 3.6, sm_90;
    benchmarks/results/chunk_kernel_variants_h200_2026-11-29.json), so the kernel has none.
  - BLOCK_M = next_power_of_2(block_q x G): block_q = 64 // G or 128 // G gives 64 or 128
    rows (one or two wgmma M tiles per warpgroup).
  - Launch defaults (kernels/chunk_tma_launch.py): 64-key steps at head dim 128; at head
    dim 64 (16-bit) 128-key steps (two pages at block_size 64): a 64-key step does too
    little MMA work per softmax update there (the H200 sweeps cited in that module).

The Triton interpreter emulates descriptor loads, so on CPU both load paths of the one
kernel body are tested against the torch reference (tests/test_kernel_chunk_tma.py).
Q is loaded once per program (pointer loads: the M tile packs tokens x G query heads of a
strided query). Every length comes from device tensors; no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from mnemosyne.kernels.chunk_splitkv_attention import check_chunk_args, split_outputs
from mnemosyne.kernels.chunk_tma_launch import (
    MAX_STEP_PAGES,
    default_tma_block_n,
    fits_page_tiles,
    step_boxes,
    tma_step_keys,
    tma_tile_launch,
)
from mnemosyne.kernels.chunk_tma_steps import tile_steps
from mnemosyne.kernels.merge_attn import merge_splits
from mnemosyne.kernels.paged_prefill import query_tile, store_tile, tile_step_range

# Split count: about 33 splits was best on an H200 for chunks of 16 to 256 queries after
# 128K and 512K keys (32 / 8 heads, head dim 128; benchmarks/results/chunk_kernel_variants_*):
# c = 128 after 128K: 17 splits 0.84 ms, 33 splits 0.67 ms; c = 32: 33 splits 0.20 ms, 66 0.21 ms.
PAGE_TILES_WAVES = 8  # programs per SM the split count aims at
PAGE_TILES_MAX_SPLITS = 32
_LOG2E = 1.4426950408889634


# Per-step ints are not specialized on (see `_chunk_split_kernel`; tests/test_no_recompile.py).
@triton.jit(do_not_specialize=[
    "stride_ot", "stride_oh", "stride_os", "stride_lt", "stride_lh", "stride_ls", "stride_bts", "num_splits",
    "min_split_steps",
])  # fmt: skip
def _chunk_tma_kernel(
    q_ptr, k_src, v_src, o_ptr, l_ptr,  # k_src / v_src: TMA descriptors (USE_TMA) or the caches
    qsl_ptr, q_pos_ptr, kv_start_ptr, kv_lens_ptr, bt_ptr, tile_seq_ptr, tile_off_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_ks, stride_kh, stride_kd, stride_vs, stride_vh, stride_vd,  # per slot (row of the 2-D view)
    stride_ot, stride_oh, stride_os, stride_od,
    stride_lt, stride_lh, stride_ls,
    stride_bts, stride_btb,
    qk_scale, window, num_splits, min_split_steps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, G: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BOX: tl.constexpr,
    PAGE: tl.constexpr, USE_WINDOW: tl.constexpr, USE_TMA: tl.constexpr,
    IEEE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    if tl.load(tile_seq_ptr + tile) < 0:  # a padding tile (a CUDA graph's fixed grid): before
        return  # any prologue, so that it frees its SM slot at once
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq, kv_len, rel0, n_q, head, rows, m_valid, io_mask, q, q_rel = query_tile(
        q_ptr, qsl_ptr, q_pos_ptr, kv_start_ptr, kv_lens_ptr, tile_seq_ptr, tile_off_ptr,
        stride_qt, stride_qh, stride_qd, tile, kv_head, HEAD_DIM, BLOCK_D, G, BLOCK_Q, BLOCK_M,
    )  # fmt: skip
    # lo aligned down to BLOCK_N: every step is whole runs, one per page (BOX keys each)
    lo, hi, i_a, i_b, s0, s1 = tile_step_range(
        rel0, n_q, kv_len, window, split, num_splits, min_split_steps, BLOCK_N, USE_WINDOW, True
    )
    lo_x = rel0 * 0  # first key the tile can see: pages wholly before it are never looked up
    if USE_WINDOW:
        lo_x = tl.maximum(rel0 - window + 1, 0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bts
    col0 = kv_head * HEAD_DIM  # TMA column of this head in the 2-D view
    k_off = kv_head.to(tl.int64) * stride_kh
    v_off = kv_head.to(tl.int64) * stride_vh
    # [s0, s1) cut by the masked head [0, i_a), the unmasked middle [i_a, i_b), the masked tail.
    acc, l_i, m_i = tile_steps(
        acc, l_i, m_i, s0, tl.minimum(i_a, s1), q, q_rel, lo, lo_x, hi, window, bt_row, stride_btb,
        k_src, v_src, col0, k_off, v_off, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
        HEAD_DIM, BLOCK_D, BOX, BLOCK_N // BOX, PAGE, True, USE_WINDOW, USE_TMA, IEEE, INTERPRET,
    )  # fmt: skip
    acc, l_i, m_i = tile_steps(
        acc, l_i, m_i, tl.maximum(i_a, s0), tl.minimum(i_b, s1), q, q_rel, lo, lo_x, hi, window, bt_row,
        stride_btb, k_src, v_src, col0, k_off, v_off, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
        HEAD_DIM, BLOCK_D, BOX, BLOCK_N // BOX, PAGE, False, USE_WINDOW, USE_TMA, IEEE, INTERPRET,
    )  # fmt: skip
    acc, l_i, m_i = tile_steps(
        acc, l_i, m_i, tl.maximum(i_b, s0), s1, q, q_rel, lo, lo_x, hi, window, bt_row, stride_btb,
        k_src, v_src, col0, k_off, v_off, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
        HEAD_DIM, BLOCK_D, BOX, BLOCK_N // BOX, PAGE, True, USE_WINDOW, USE_TMA, IEEE, INTERPRET,
    )  # fmt: skip

    # An empty split (a short sequence under a fixed split count) writes only its LSE, -inf:
    # the merge does not read its output.
    io_mask = io_mask & ((s1 > s0) | (num_splits == 1))
    store_tile(
        acc, l_i, m_i, o_ptr, l_ptr, rows, head, split, io_mask, m_valid,
        stride_ot, stride_oh, stride_os, stride_od, stride_lt, stride_lh, stride_ls, BLOCK_D,
    )  # fmt: skip


def tma_supported(head_dim: int, device: torch.device) -> bool:
    """Whether K/V tiles of this head dim can be TMA boxes here: a power-of-two head dim
    (a D-wide box of a padded dim would read the next head), on sm_90+ or the interpreter."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return False
    if triton.knobs.runtime.interpret:
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def chunk_tma_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    q_pos_start: torch.Tensor,  # [num_seqs] int64
    kv_start: torch.Tensor,  # [num_seqs] int64
    kv_lens: torch.Tensor,  # [num_seqs] int32
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    tile_seq: torch.Tensor,  # [num_tiles] int32
    tile_q_offset: torch.Tensor,  # [num_tiles] int32
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], query dtype
    lse: torch.Tensor,  # [num_tokens, num_heads] float32
    scale: float,
    sliding_window: int | None,
    num_splits: int = 1,
    merge_rows: torch.Tensor | None = None,  # [num_covered_rows] int32: the tiles' packed rows
    block_q: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    min_split_keys: int = 0,  # each split takes at least this many keys (rounded down to
    # whole steps): a sequence shorter than num_splits * min_split_keys leaves splits empty
    use_tma: bool | None = None,
) -> None:
    """`chunk_splitkv_attention` with page-aligned K/V tiles (see the module docstring);
    the same arguments and outputs, plus:

    block_n: keys per step (None: `default_tma_block_n`), dividing the cache's block_size or
    2 .. MAX_STEP_PAGES whole pages (`step_boxes`). block_q None: `default_block_q` (plan the
    tiles with the same block_q).
    num_warps / num_stages None: `tma_tile_launch`.
    use_tma: None = TMA descriptors where `tma_supported`, else pointer loads of the same
    tiles; True = descriptors or ValueError; False = pointer loads.
    Launch only: no host sync."""
    check_chunk_args(query, k_cache, v_cache, out, lse, sliding_window, num_splits, merge_rows)
    num_tokens, num_heads, head_dim = query.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("chunk_tma_attention needs contiguous K/V caches (one 2-D row per slot)")
    block_n = default_tma_block_n(page, query.dtype, head_dim) if block_n is None else block_n
    box, _ = step_boxes(block_n, page)
    if use_tma is None:
        use_tma = tma_supported(head_dim, query.device)
    elif use_tma and not tma_supported(head_dim, query.device):
        raise ValueError(f"TMA K/V tiles need a power-of-two head_dim >= 16 on sm_90+, got {head_dim}")
    num_tiles = tile_seq.shape[0]
    if num_tiles == 0 or num_tokens == 0:
        return
    num_heads_per_kv = num_heads // num_kv_heads
    block_q, block_m, block_d, num_warps, num_stages = tma_tile_launch(
        query, num_heads_per_kv, block_q, block_n, num_warps, num_stages
    )
    o_ws, l_ws, o_strides, l_strides = split_outputs(query, out, lse, num_splits, workspace)
    # [num_blocks * block_size, num_kv_heads * head_dim]: one row per slot
    k_rows = k_cache.view(-1, num_kv_heads * head_dim)
    v_rows = v_cache.view(-1, num_kv_heads * head_dim)
    if use_tma:
        k_src = TensorDescriptor.from_tensor(k_rows, [box, head_dim])
        v_src = TensorDescriptor.from_tensor(v_rows, [box, head_dim])
    else:
        k_src, v_src = k_rows, v_rows
    _chunk_tma_kernel[(num_tiles, num_kv_heads, num_splits)](
        query, k_src, v_src, o_ws, l_ws,
        query_start_loc, q_pos_start, kv_start, kv_lens, block_tables, tile_seq, tile_q_offset,
        *query.stride(), *k_cache.stride()[1:], *v_cache.stride()[1:], *o_strides, *l_strides,
        *block_tables.stride(),
        scale * _LOG2E, 0 if sliding_window is None else sliding_window, num_splits,
        max(1, min_split_keys // block_n),
        HEAD_DIM=head_dim, BLOCK_D=block_d, G=num_heads_per_kv,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BOX=box, PAGE=page,
        USE_WINDOW=sliding_window is not None, USE_TMA=use_tma,
        IEEE=query.dtype == torch.float32, INTERPRET=triton.knobs.runtime.interpret,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if num_splits > 1:
        assert merge_rows is not None
        merge_splits(o_ws, l_ws, out, lse, merge_rows, num_splits)


__all__ = [
    "MAX_STEP_PAGES",
    "PAGE_TILES_MAX_SPLITS",
    "PAGE_TILES_WAVES",
    "chunk_tma_attention",
    "default_tma_block_n",
    "fits_page_tiles",
    "step_boxes",
    "tma_step_keys",
    "tma_supported",
    "tma_tile_launch",
]
