"""Hopper-oriented split-KV attention of prefill chunks: page-aligned K/V tiles loaded by TMA.

The same semantics, tiles, split workspace and exact LSE merge as
`chunk_splitkv_attention` (read its docstring for the tile / M-packing / split invariants);
this variant differs only in how a program walks its keys. It requires
block_size % BLOCK_N == 0, so that every BLOCK_N-key step is one contiguous run of rows
inside one page, and aligns the walk to BLOCK_N in local key coordinates::

    local key j (0 <= j < kv_len):  page(j) = block_tables[s, j // PAGE],  row = page(j) * PAGE + j % PAGE
    step i covers local keys [n0, n0 + BLOCK_N),  n0 = lo + i * BLOCK_N,  lo = floor(lo' / BLOCK_N) * BLOCK_N
            (lo' = first key the tile's window can see; keys in [lo, lo') are masked by the window test)
    its K tile = rows [page(n0) * PAGE + n0 % PAGE, + BLOCK_N) x columns [kv_head * D, + D)
            of the cache viewed as 2-D [num_blocks * PAGE, num_kv_heads * D]  (one page lookup per step)

    step:   0 ... i_a ............................. i_b ......... n_steps
            | masked head |   fully visible, unmasked   | masked tail (causal / past kv_len)

A masked step's tile may run past kv_len into unwritten slots of its page (any bits, NaN
included): scores there are replaced by -inf and the V rows by 0 before the P @ V product.

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

from mnemosyne.kernels.chunk_splitkv_attention import (
    check_chunk_args,
    merge_splits,
    split_outputs,
    tile_launch,
)
from mnemosyne.kernels.paged_prefill import _dot, query_tile, store_tile, tile_step_range

# Split count: about 33 splits was best on an H200 for chunks of 16 to 256 queries after
# 128K and 512K keys (32 / 8 heads, head dim 128; benchmarks/results/chunk_kernel_variants_*):
# c = 128 after 128K: 17 splits 0.84 ms, 33 splits 0.67 ms; c = 32: 33 splits 0.20 ms, 66 0.21 ms.
PAGE_TILES_WAVES = 8  # programs per SM the split count aims at
PAGE_TILES_MAX_SPLITS = 32
_LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(
    src, row0, col0, head_ptr_off, stride_s, stride_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    """[BLOCK_N, BLOCK_D] rows row0 .. row0 + BLOCK_N - 1 (slots of one page) of one KV head:
    a TMA box at (row0, col0) of the 2-D cache view, or the same elements by pointers."""
    if USE_TMA:
        return src.load([row0, col0])
    else:
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = (
            src + head_ptr_off + (row0.to(tl.int64) + offs_n)[:, None] * stride_s + offs_d[None, :] * stride_d
        )
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _tile_step(
    acc, l_i, m_i,  # [BLOCK_M, BLOCK_D], [BLOCK_M], [BLOCK_M] float32: output sum, exp2 sum, max (log2 units)
    q, q_rel,  # [BLOCK_M, BLOCK_D] queries, [BLOCK_M] int32 query position - kv_start
    n0, hi, window,  # first local key of this step (a multiple of BLOCK_N); end of the tile's keys
    bt_row_ptr, stride_btb, k_src, v_src, col0, k_head_off, v_head_off,
    stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    MASKED: tl.constexpr, USE_WINDOW: tl.constexpr, USE_TMA: tl.constexpr,
    IEEE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over the BLOCK_N keys of one page run."""
    page = tl.load(bt_row_ptr + (n0 // PAGE) * stride_btb)
    row0 = page * PAGE + n0 % PAGE
    k = _load_tile(k_src, row0, col0, k_head_off, stride_ks, stride_kd, HEAD_DIM, BLOCK_D, BLOCK_N, USE_TMA)
    s = _dot(q, tl.trans(k.to(q.dtype)), None, IEEE, INTERPRET)  # [BLOCK_M, BLOCK_N], raw scores
    v = _load_tile(v_src, row0, col0, v_head_off, stride_vs, stride_vd, HEAD_DIM, BLOCK_D, BLOCK_N, USE_TMA)
    if MASKED:
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] local key indices
        n_valid = offs_n < hi
        visible = n_valid[None, :] & (offs_n[None, :] <= q_rel[:, None])
        if USE_WINDOW:
            visible = visible & (q_rel[:, None] - offs_n[None, :] < window)
        s = tl.where(visible, s * qk_scale, float("-inf"))  # log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.math.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]; 0 where masked
        v = tl.where(n_valid[:, None], v, 0.0)  # slots past kv_len may hold NaN
    else:  # every valid row sees every key (padded rows have q = 0): the max is finite
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_safe = m_new
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(q.dtype), v.to(q.dtype), acc, IEEE, INTERPRET)
    return acc, l_i, m_new


@triton.jit
def _tile_steps(
    acc, l_i, m_i, i0, i1, q, q_rel, lo, hi, window, bt_row_ptr, stride_btb, k_src, v_src, col0,
    k_head_off, v_head_off, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    MASKED: tl.constexpr, USE_WINDOW: tl.constexpr, USE_TMA: tl.constexpr,
    IEEE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Steps i0 .. i1-1 of BLOCK_N keys from local key lo (a multiple of BLOCK_N)."""
    if INTERPRET:  # the interpreter (numpy >= 2.4) cannot take a loaded scalar as a range() bound
        i = i0
        while i < i1:
            acc, l_i, m_i = _tile_step(
                acc, l_i, m_i, q, q_rel, lo + i * BLOCK_N, hi, window, bt_row_ptr, stride_btb, k_src, v_src,
                col0, k_head_off, v_head_off, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
                HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, MASKED, USE_WINDOW, USE_TMA, IEEE, INTERPRET,
            )  # fmt: skip
            i += 1
    else:
        for i in tl.range(i0, i1):
            acc, l_i, m_i = _tile_step(
                acc, l_i, m_i, q, q_rel, lo + i * BLOCK_N, hi, window, bt_row_ptr, stride_btb, k_src, v_src,
                col0, k_head_off, v_head_off, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
                HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, MASKED, USE_WINDOW, USE_TMA, IEEE, INTERPRET,
            )  # fmt: skip
    return acc, l_i, m_i


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
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_TMA: tl.constexpr,
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
    # lo aligned down to BLOCK_N: every step is one run inside one page
    lo, hi, i_a, i_b, s0, s1 = tile_step_range(
        rel0, n_q, kv_len, window, split, num_splits, min_split_steps, BLOCK_N, USE_WINDOW, True
    )

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bts
    col0 = kv_head * HEAD_DIM  # TMA column of this head in the 2-D view
    k_off = kv_head.to(tl.int64) * stride_kh
    v_off = kv_head.to(tl.int64) * stride_vh
    acc, l_i, m_i = _tile_steps(
        acc, l_i, m_i, s0, tl.minimum(i_a, s1), q, q_rel, lo, hi, window, bt_row, stride_btb, k_src, v_src,
        col0, k_off, v_off, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, True, USE_WINDOW, USE_TMA, IEEE, INTERPRET,
    )  # fmt: skip
    acc, l_i, m_i = _tile_steps(
        acc, l_i, m_i, tl.maximum(i_a, s0), tl.minimum(i_b, s1), q, q_rel, lo, hi, window, bt_row, stride_btb,
        k_src, v_src, col0, k_off, v_off, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, False, USE_WINDOW, USE_TMA, IEEE, INTERPRET,
    )  # fmt: skip
    acc, l_i, m_i = _tile_steps(
        acc, l_i, m_i, tl.maximum(i_b, s0), s1, q, q_rel, lo, hi, window, bt_row, stride_btb, k_src, v_src,
        col0, k_off, v_off, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, True, USE_WINDOW, USE_TMA, IEEE, INTERPRET,
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


def tma_step_keys(dtype: torch.dtype) -> int:
    """Keys per step of the page-aligned walk: 64 (16-bit) or 32 (float32)."""
    return 64 if dtype.itemsize <= 2 else 32


def default_tma_block_n(page: int, dtype: torch.dtype) -> int:
    """Keys per step: `tma_step_keys`, capped by the page size."""
    return min(tma_step_keys(dtype), page)


def fits_page_tiles(block_size: int, dtype: torch.dtype) -> bool:
    """Whether a cache of this block size takes whole `tma_step_keys` steps (what the engine
    runs this kernel with; smaller steps were not measured faster than per-key gathers)."""
    return block_size % tma_step_keys(dtype) == 0


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

    block_n must divide the cache's block_size (None: `default_tma_block_n`).
    use_tma: None = TMA descriptors where `tma_supported`, else pointer loads of the same
    tiles; True = descriptors or ValueError; False = pointer loads.
    Launch only: no host sync."""
    check_chunk_args(query, k_cache, v_cache, out, lse, sliding_window, num_splits, merge_rows)
    num_tokens, num_heads, head_dim = query.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("chunk_tma_attention needs contiguous K/V caches (one 2-D row per slot)")
    block_n = default_tma_block_n(page, query.dtype) if block_n is None else block_n
    if block_n < 16 or block_n & (block_n - 1) or page % block_n:
        raise ValueError(
            f"chunk_tma_attention needs block_n a power of two >= 16 dividing the cache's block_size "
            f"(one step = one run inside a page); got block_n {block_n}, block_size {page}"
        )
    if use_tma is None:
        use_tma = tma_supported(head_dim, query.device)
    elif use_tma and not tma_supported(head_dim, query.device):
        raise ValueError(f"TMA K/V tiles need a power-of-two head_dim >= 16 on sm_90+, got {head_dim}")
    num_tiles = tile_seq.shape[0]
    if num_tiles == 0 or num_tokens == 0:
        return
    num_heads_per_kv = num_heads // num_kv_heads
    block_q, block_m, block_d, num_warps, num_stages = tile_launch(
        query, num_heads_per_kv, block_q, num_warps, num_stages
    )
    o_ws, l_ws, o_strides, l_strides = split_outputs(query, out, lse, num_splits, workspace)
    # [num_blocks * block_size, num_kv_heads * head_dim]: one row per slot
    k_rows = k_cache.view(-1, num_kv_heads * head_dim)
    v_rows = v_cache.view(-1, num_kv_heads * head_dim)
    if use_tma:
        k_src = TensorDescriptor.from_tensor(k_rows, [block_n, head_dim])
        v_src = TensorDescriptor.from_tensor(v_rows, [block_n, head_dim])
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
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, PAGE=page,
        USE_WINDOW=sliding_window is not None, USE_TMA=use_tma,
        IEEE=query.dtype == torch.float32, INTERPRET=triton.knobs.runtime.interpret,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if num_splits > 1:
        assert merge_rows is not None
        merge_splits(o_ws, l_ws, out, lse, merge_rows, num_splits)


__all__ = [
    "PAGE_TILES_MAX_SPLITS",
    "PAGE_TILES_WAVES",
    "chunk_tma_attention",
    "default_tma_block_n",
    "fits_page_tiles",
    "tma_step_keys",
    "tma_supported",
]
