"""Warp-specialized chunk attention for Hopper (Gluon): `chunk_tma_attention`'s contract, one
wave of persistent programs, each a TMA loader warp and two consumer warpgroups.

Why: at 32-128-token chunks after 128K-512K keys (8B heads: 32 / 8, head dim 128, bf16, one
H200) the Triton TMA kernel runs at 1.31-1.46x the attention floor; this design ran the same
chunks over their prefix at 1.13-1.25x (`benchmarks/probes/gluon_chunk_prefix.py`,
benchmarks/results/session18_h200x2_2026-12-01/). Triton 3.6 does not overlap one tile's
softmax with the next tile's tensor-core work on sm_90; here that is written out.

Tiles and keys are the Triton kernels' (`chunk_splitkv_attention`'s docstring): a tile is up
to BLOCK_Q tokens of one sequence x the G query heads of one KV head (128 rows; row r is
token r // G, head kv_head * G + r % G); it walks its keys [lo, hi) relative to kv_start
in BLOCK_N = block_size steps, one page each (`tile_step_range`: steps [0, i_a) and
[i_b, n_steps) take the causal / window mask, those between are seen by every valid row).

Work (one wave: the grid is one program per SM, 1 CTA per SM by shared memory)::

    steps_t   = the live tile t's steps (tile_seq[t] >= 0; padding tiles are -1, anywhere)
    splits_t  = max(1, min(floor(steps_t x programs / (sum_t steps_t x KVH)), num_splits,
                           steps_t // min_split_steps))
                its share of one wave, rounded down: the items fit the programs (17 splits
                of one tile x 8 KV heads = 136 items on 132 SMs took two rounds: in the 8B
                mixed scenario on an H200 32-token chunks after 128K-160K keys then took
                20.2 ms steps, where the TMA kernel's engine ran 96-token chunks in 27.1 ms);
                a long prefix gets many splits, a short one few, each at least one
    items     = [(t, split, kv_head) for t, split < splits_t, kv_head]  in tile order
    program p takes items p, p + programs, p + 2 programs, ...
    an item   = the split's steps [split x ceil(steps_t / splits_t), ...) of tile t, one KV head;
                it writes its split's partial output and LSE, and split 0 also writes LSE -inf
                into splits [splits_t, num_splits) of its rows (the merge skips them)

    Every partition (loader, consumer 0, consumer 1) walks the same items in the same order;
    a running step count over the items gives each step its stage and phase:
        stage = count % NUM_STAGES, phase = (count // NUM_STAGES) & 1
        loader:    wait empty[stage] (phase ^ 1), expect ready[stage], TMA K and V of the page
        consumers: wait ready[stage]; S = Q K^T (wgmma) for step i + 1 in flight through the
                   softmax of step i; O += P V (wgmma, async); arrive empty[stage of i - 1]
                   once its PV completed (count 2: both consumers)
        consumer h holds rows [64 h, 64 h + 64) of the tile

Cache slots past kv_len are read (the last page's tail) and their P is 0: they must hold
finite values, which the engine's zero-initialized caches guarantee (`worker.allocate_kv_caches`;
a slot of a freed block holds an old finite K/V). bf16 / fp16, head dim 64 or 128, block
size 64, G x BLOCK_Q <= 128 (`ws_supported`). No host sync; CUDA-graph capturable (every
length is read on the device, the grid is fixed).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from mnemosyne.kernels.chunk_splitkv_attention import check_chunk_args, split_outputs
from mnemosyne.kernels.merge_attn import merge_splits
from mnemosyne.kernels.paged_prefill import default_block_q

WS_PAGE = 64  # keys per step: one page of the cache
WS_ROWS = 128  # rows of a tile: two consumers x 64
WS_STAGES = 4  # K/V stages in shared memory (3 and 5 measured slower: session 18 c/)
WS_MAXNREG = 168  # 12 warps (4 + 4 + 1, rounded to warpgroups) x 32 x 168 <= 65536
_LOG2E = 1.4426950408889634
# the same, as the kernels read them (a Gluon kernel reads only constexpr globals)
_PAGE = gl.constexpr(WS_PAGE)
_ROWS = gl.constexpr(WS_ROWS)
_STAGES = gl.constexpr(WS_STAGES)


@gluon.jit
def _tile_range(w, t, BLOCK_Q: gl.constexpr, USE_WINDOW: gl.constexpr):
    """Tile t's (seq, row0 + q0, n_q, rel0, lo, hi, i_a, i_b, n_steps), or n_steps 0 for a
    padding tile (`paged_prefill.query_tile` and `tile_step_range` with lo aligned down to a
    page: Gluon code cannot call those Triton functions)."""
    (tile_seq_ptr, tile_off_ptr, qsl_ptr, q_pos_ptr, kv_start_ptr, kv_lens_ptr, window, num_tiles,
     num_kv_heads, num_splits, min_split_steps) = w  # fmt: skip
    seq_or_pad = gl.load(tile_seq_ptr + t)
    live = seq_or_pad >= 0
    seq = gl.maximum(seq_or_pad, 0)
    q0 = gl.load(tile_off_ptr + t)
    row0 = gl.load(qsl_ptr + seq)
    n_q = gl.where(live, gl.minimum(gl.load(qsl_ptr + seq + 1) - row0 - q0, BLOCK_Q), 0)
    kv_len = gl.where(live, gl.load(kv_lens_ptr + seq), 0)
    rel0 = (gl.load(q_pos_ptr + seq) - gl.load(kv_start_ptr + seq)).to(gl.int32) + q0
    hi = gl.minimum(kv_len, rel0 + n_q)
    full_hi = gl.minimum(hi, rel0 + 1)
    lo = rel0 * 0
    full_lo = lo
    if USE_WINDOW:
        lo = (gl.maximum(rel0 - window + 1, 0) // _PAGE) * _PAGE
        full_lo = gl.maximum(lo, rel0 + n_q - window)
    n_steps = gl.cdiv(gl.maximum(hi - lo, 0), _PAGE)
    i_a = gl.minimum(gl.cdiv(full_lo - lo, _PAGE), n_steps)
    i_b = gl.maximum(gl.minimum(gl.maximum(full_hi - lo, 0) // _PAGE, n_steps), i_a)
    return seq, row0 + q0, n_q, rel0, lo, hi, i_a, i_b, n_steps


@gluon.jit
def _tile_splits(w, t, total, BLOCK_Q: gl.constexpr, USE_WINDOW: gl.constexpr):
    """Tile t's splits (0 for a padding tile): its share of one wave by its steps, rounded
    down (so that the items fit the programs), at least 1, at most num_splits and its steps /
    min_split_steps."""
    (tile_seq_ptr, tile_off_ptr, qsl_ptr, q_pos_ptr, kv_start_ptr, kv_lens_ptr, window, num_tiles,
     num_kv_heads, num_splits, min_split_steps) = w  # fmt: skip
    n_steps = _tile_range(w, t, BLOCK_Q, USE_WINDOW)[8]
    share = (n_steps * gl.num_programs(0)) // gl.maximum(total * num_kv_heads, 1)
    sp = gl.minimum(gl.minimum(share, num_splits), n_steps // min_split_steps)
    return gl.where(gl.load(tile_seq_ptr + t) >= 0, gl.maximum(sp, 1), 0)


@gluon.jit
def _schedule(w, BLOCK_Q: gl.constexpr, USE_WINDOW: gl.constexpr):
    """(total, num_items): the live tiles' steps and the launch's items (module docstring)."""
    (tile_seq_ptr, tile_off_ptr, qsl_ptr, q_pos_ptr, kv_start_ptr, kv_lens_ptr, window, num_tiles,
     num_kv_heads, num_splits, min_split_steps) = w  # fmt: skip
    total = num_tiles * 0
    for t in range(num_tiles):
        r = _tile_range(w, t, BLOCK_Q, USE_WINDOW)
        total += r[8]
    items = num_tiles * 0
    for t in range(num_tiles):
        items += _tile_splits(w, t, total, BLOCK_Q, USE_WINDOW) * num_kv_heads
    return total, items


@gluon.jit
def _find_item(w, idx, total, BLOCK_Q: gl.constexpr, USE_WINDOW: gl.constexpr):
    """Item idx's (tile, split, kv_head, splits of its tile)."""
    (tile_seq_ptr, tile_off_ptr, qsl_ptr, q_pos_ptr, kv_start_ptr, kv_lens_ptr, window, num_tiles,
     num_kv_heads, num_splits, min_split_steps) = w  # fmt: skip
    first = idx * 0
    tile = idx * 0
    local = idx * 0
    splits = idx * 0 + 1
    for t in range(num_tiles):
        sp = _tile_splits(w, t, total, BLOCK_Q, USE_WINDOW)
        n = sp * num_kv_heads
        hit = (idx >= first) & (idx < first + n)
        tile = gl.where(hit, t, tile)
        local = gl.where(hit, idx - first, local)
        splits = gl.where(hit, sp, splits)
        first += n
    return tile, local // num_kv_heads, local % num_kv_heads, splits


@gluon.jit
def _item(w, idx, total, BLOCK_Q: gl.constexpr, USE_WINDOW: gl.constexpr, STRIDED: gl.constexpr):
    """Item idx: (kv_head, split, splits of its tile, seq, row0 + q0, n_q, rel0, lo, hi, i_a,
    i_b, first, stride, n), its steps first + j x stride for j in [0, n): the split's share of
    the tile's steps, one contiguous range (stride 1) or every splits-th step from the
    split's index (STRIDED); the loader and both consumers read their items through this one
    function."""
    tile, split, kv_head, splits = _find_item(w, idx, total, BLOCK_Q, USE_WINDOW)
    seq, row0, n_q, rel0, lo, hi, i_a, i_b, n_steps = _tile_range(w, tile, BLOCK_Q, USE_WINDOW)
    if STRIDED:
        first = split
        stride = splits
        n = gl.cdiv(gl.maximum(n_steps - split, 0), splits)
    else:
        each = gl.cdiv(n_steps, splits)
        first = gl.minimum(split * each, n_steps)
        stride = splits * 0 + 1
        n = gl.minimum(first + each, n_steps) - first
    return kv_head, split, splits, seq, row0, n_q, rel0, lo, hi, i_a, i_b, first, stride, n


@gluon.jit
def _loader(a, BLOCK_Q: gl.constexpr, G: gl.constexpr, HEAD_DIM: gl.constexpr, USE_WINDOW: gl.constexpr,
            STRIDED: gl.constexpr):  # fmt: skip
    (w, q_ptr, k_desc, v_desc, o_ptr, l_ptr, bt_ptr, stride_bts, q_smem, k_smem, v_smem, ready, empty,
     strides, qk_scale) = a  # fmt: skip
    total, num_items = _schedule(w, BLOCK_Q, USE_WINDOW)
    count = total * 0
    for idx in range(gl.program_id(0), num_items, gl.num_programs(0)):
        kv_head, split, splits, seq, row0, n_q, rel0, lo, hi, i_a, i_b, first, stride, n = _item(
            w, idx, total, BLOCK_Q, USE_WINDOW, STRIDED
        )
        bt_row = bt_ptr + seq.to(gl.int64) * stride_bts
        for j in range(0, n):
            i = first + j * stride
            st = count % _STAGES
            mbarrier.wait(empty.index(st), ((count // _STAGES) & 1) ^ 1)
            page = gl.load(bt_row + (lo // _PAGE + i))
            bar = ready.index(st)
            mbarrier.expect(bar, 2 * _PAGE * HEAD_DIM * k_desc.dtype.primitive_bitwidth // 8)
            tma.async_copy_global_to_shared(k_desc, [page * _PAGE, kv_head * HEAD_DIM], bar, k_smem.index(st))
            tma.async_copy_global_to_shared(v_desc, [page * _PAGE, kv_head * HEAD_DIM], bar, v_smem.index(st))
            count += 1


@gluon.jit
def _consume(a, H: gl.constexpr, BLOCK_Q: gl.constexpr, G: gl.constexpr, HEAD_DIM: gl.constexpr,
             USE_WINDOW: gl.constexpr, STRIDED: gl.constexpr):  # fmt: skip
    """Consumer H: rows [64 H, 64 H + 64) of every item's tile (module docstring)."""
    (w, q_ptr, k_desc, v_desc, o_ptr, l_ptr, bt_ptr, stride_bts, q_smem, k_smem, v_smem, ready, empty,
     strides, qk_scale) = a  # fmt: skip
    (tile_seq_ptr, tile_off_ptr, qsl_ptr, q_pos_ptr, kv_start_ptr, kv_lens_ptr, window, num_tiles,
     num_kv_heads, num_splits, min_split_steps) = w  # fmt: skip
    stride_qt, stride_qh, stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_ls = strides
    ROWS: gl.constexpr = _ROWS // 2
    dtype: gl.constexpr = k_desc.dtype
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, _PAGE, 16])
    mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, mma_s)
    row_o: gl.constexpr = gl.SliceLayout(1, mma_o)
    blk: gl.constexpr = gl.BlockedLayout(
        size_per_thread=[1, 8], threads_per_warp=[32 * 8 // HEAD_DIM, HEAD_DIM // 8],
        warps_per_cta=[4, 1], order=[1, 0],
    )  # fmt: skip
    r_blk = H * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, blk))  # [ROWS] tile rows
    r_s = H * ROWS + gl.arange(0, ROWS, layout=row_s)
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, blk))
    keys = gl.arange(0, _PAGE, layout=gl.SliceLayout(0, mma_s))
    q_own = q_smem.index(H)
    s_zero = gl.zeros([ROWS, _PAGE], gl.float32, layout=mma_s)

    total, num_items = _schedule(w, BLOCK_Q, USE_WINDOW)
    count = total * 0
    for idx in range(gl.program_id(0), num_items, gl.num_programs(0)):
        kv_head, split, splits, seq, row0, n_q, rel0, lo, hi, i_a, i_b, first, stride, n = _item(
            w, idx, total, BLOCK_Q, USE_WINDOW, STRIDED
        )
        tok = r_blk // G
        head = kv_head * G + r_blk % G
        valid = tok < n_q
        rows = (row0 + tok).to(gl.int64)
        q = gl.load(q_ptr + rows[:, None] * stride_qt + head[:, None] * stride_qh + cols[None, :],
                    mask=valid[:, None], other=0.0)  # fmt: skip
        q_own.store(q)
        fence_async_shared()
        q_rel = rel0 + r_s // G  # [ROWS] query position - kv_start

        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.full([ROWS], 0.0, gl.float32, layout=row_s)
        acc = warpgroup_mma_init(gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=mma_o))
        st = count % _STAGES
        mbarrier.wait(ready.index(st), (count // _STAGES) & 1, pred=n > 0)
        s_cur = warpgroup_mma(q_own, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False)
        for j in range(0, n):
            i = first + j * stride
            st = count % _STAGES
            nx = count + 1
            nst = nx % _STAGES
            mbarrier.wait(ready.index(nst), (nx // _STAGES) & 1, pred=j + 1 < n)
            s_nxt = warpgroup_mma(q_own, k_smem.index(nst).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            if (i < i_a) | (i >= i_b):  # the causal / window mask
                kk = lo + i * _PAGE + keys
                vis = (kk[None, :] < hi) & (kk[None, :] <= q_rel[:, None])
                if USE_WINDOW:
                    vis = vis & (q_rel[:, None] - kk[None, :] < window)
                s_cur = gl.where(vis, s_cur, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s_cur, axis=1) * qk_scale)
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(s_cur * qk_scale - m_safe[:, None])
            alpha = gl.exp2(m_i - m_safe)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            p16 = gl.convert_layout(p.to(dtype), p_op)
            acc = warpgroup_mma_wait(1, deps=[acc])  # PV of the step before done: release its stage
            mbarrier.arrive(empty.index((count + _STAGES - 1) % _STAGES), pred=j > 0)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            acc = warpgroup_mma(p16, v_smem.index(st), acc, is_async=True)
            s_cur = warpgroup_mma_wait(1, deps=[s_nxt])
            count += 1
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index((count + _STAGES - 1) % _STAGES), pred=n > 0)

        seen = l_i > 0.0
        l_safe = gl.where(seen, l_i, 1.0)
        lse = gl.where(seen, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        o = gl.convert_layout(acc / gl.convert_layout(l_safe, row_o)[:, None], blk)
        o_off = rows[:, None] * stride_ot + head[:, None] * stride_oh + split * stride_os + cols[None, :]
        gl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=valid[:, None])
        lse_rows = gl.convert_layout(lse, gl.SliceLayout(1, blk))
        l_off = rows * stride_lt + head * stride_lh
        gl.store(l_ptr + l_off + split * stride_ls, lse_rows, mask=valid)
        for s in range(splits, num_splits):  # split 0: the splits this tile does not use are empty
            gl.store(l_ptr + l_off + s * stride_ls, gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, blk)),
                     mask=valid & (split == 0))  # fmt: skip


@gluon.jit
def _consumer0(a, BLOCK_Q: gl.constexpr, G: gl.constexpr, HEAD_DIM: gl.constexpr, USE_WINDOW: gl.constexpr,
               STRIDED: gl.constexpr):  # fmt: skip
    _consume(a, 0, BLOCK_Q, G, HEAD_DIM, USE_WINDOW, STRIDED)


@gluon.jit
def _consumer1(a, BLOCK_Q: gl.constexpr, G: gl.constexpr, HEAD_DIM: gl.constexpr, USE_WINDOW: gl.constexpr,
               STRIDED: gl.constexpr):  # fmt: skip
    _consume(a, 1, BLOCK_Q, G, HEAD_DIM, USE_WINDOW, STRIDED)


# Per-step ints are not specialized on (a new variant would compile mid-serving:
# tests/test_no_recompile.py); the launch options and constexprs are warm-up's.
@gluon.jit(do_not_specialize=[
    "stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_os", "stride_lt", "stride_lh", "stride_ls",
    "stride_bts", "window", "num_tiles", "num_kv_heads", "num_splits", "min_split_steps",
])  # fmt: skip
def _chunk_ws_kernel(
    q_ptr, k_desc, v_desc, o_ptr, l_ptr,
    qsl_ptr, q_pos_ptr, kv_start_ptr, kv_lens_ptr, bt_ptr, tile_seq_ptr, tile_off_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_ls, stride_bts,
    qk_scale, window, num_tiles, num_kv_heads, num_splits, min_split_steps,
    HEAD_DIM: gl.constexpr, G: gl.constexpr, BLOCK_Q: gl.constexpr, USE_WINDOW: gl.constexpr, STRIDED: gl.constexpr,
):  # fmt: skip
    dtype: gl.constexpr = k_desc.dtype
    q_smem = gl.allocate_shared_memory(
        dtype, [2, _ROWS // 2, HEAD_DIM], gl.NVMMASharedLayout.get_default_for([_ROWS // 2, HEAD_DIM], dtype)
    )
    k_smem = gl.allocate_shared_memory(dtype, [_STAGES, _PAGE, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [_STAGES, _PAGE, HEAD_DIM], v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    w = (tile_seq_ptr, tile_off_ptr, qsl_ptr, q_pos_ptr, kv_start_ptr, kv_lens_ptr, window, num_tiles,
         num_kv_heads, num_splits, min_split_steps)  # fmt: skip
    strides = (stride_qt, stride_qh, stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_ls)
    a = (w, q_ptr, k_desc, v_desc, o_ptr, l_ptr, bt_ptr, stride_bts, q_smem, k_smem, v_smem, ready, empty,
         strides, qk_scale)  # fmt: skip
    gl.warp_specialize([
        (_consumer0, (a, BLOCK_Q, G, HEAD_DIM, USE_WINDOW, STRIDED)),
        (_consumer1, (a, BLOCK_Q, G, HEAD_DIM, USE_WINDOW, STRIDED)),
        (_loader, (a, BLOCK_Q, G, HEAD_DIM, USE_WINDOW, STRIDED)),
    ], [4, 1], [232, 24])  # fmt: skip


def ws_supported(head_dim: int, dtype: torch.dtype, block_size: int, num_heads_per_kv: int, block_q: int,
                 device: torch.device) -> bool:  # fmt: skip
    """Whether `chunk_ws_attention` serves this layout here (module docstring)."""
    return (
        device.type == "cuda"
        and not triton.knobs.runtime.interpret
        and torch.cuda.get_device_capability(device)[0] == 9
        and dtype in (torch.bfloat16, torch.float16)
        and head_dim in (64, 128)
        and block_size == WS_PAGE
        and block_q * num_heads_per_kv <= WS_ROWS
    )


def chunk_ws_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    q_pos_start: torch.Tensor,  # [num_seqs] int64
    kv_start: torch.Tensor,  # [num_seqs] int64
    kv_lens: torch.Tensor,  # [num_seqs] int32
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    tile_seq: torch.Tensor,  # [num_tiles] int32: live tiles first, then -1
    tile_q_offset: torch.Tensor,  # [num_tiles] int32
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], query dtype
    lse: torch.Tensor,  # [num_tokens, num_heads] float32
    scale: float,
    sliding_window: int | None,
    num_splits: int = 1,  # the most splits a tile takes (the workspace's); the device picks each tile's
    merge_rows: torch.Tensor | None = None,  # [num_covered_rows] int32: the tiles' packed rows
    block_q: int | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    min_split_keys: int = 0,
    num_programs: int | None = None,  # one wave: the device's SM count (None: asked of the device)
    strided_splits: bool = False,  # a split takes every splits-th step, not one contiguous range
) -> None:
    """`chunk_tma_attention`'s arguments and outputs on the warp-specialized kernel (module
    docstring); `ws_supported` must hold. Launch only: no host sync."""
    check_chunk_args(query, k_cache, v_cache, out, lse, sliding_window, num_splits, merge_rows)
    num_tokens, num_heads, head_dim = query.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    g = num_heads // num_kv_heads
    block_q = default_block_q(g, query.dtype) if block_q is None else block_q
    if not ws_supported(head_dim, query.dtype, page, g, block_q, query.device):
        raise ValueError(f"the warp-specialized chunk kernel does not serve head_dim={head_dim}, "
                         f"{query.dtype}, block_size={page}, {g} heads per KV head x block_q={block_q} here")  # fmt: skip
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and query.stride(2) == 1):
        raise ValueError("chunk_ws_attention needs contiguous K/V caches and a contiguous query head dim")
    num_tiles = tile_seq.shape[0]
    if num_tiles == 0 or num_tokens == 0:
        return
    o_ws, l_ws, o_strides, l_strides = split_outputs(query, out, lse, num_splits, workspace)
    gl_dtype = gl.bfloat16 if query.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([WS_PAGE, head_dim], gl_dtype)
    k_desc = TensorDescriptor.from_tensor(k_cache.view(-1, num_kv_heads * head_dim), [WS_PAGE, head_dim], layout)
    v_desc = TensorDescriptor.from_tensor(v_cache.view(-1, num_kv_heads * head_dim), [WS_PAGE, head_dim], layout)
    if num_programs is None:
        num_programs = torch.cuda.get_device_properties(query.device).multi_processor_count
    _chunk_ws_kernel[(num_programs,)](
        query, k_desc, v_desc, o_ws, l_ws,
        query_start_loc, q_pos_start, kv_start, kv_lens, block_tables, tile_seq, tile_q_offset,
        query.stride(0), query.stride(1), o_strides[0], o_strides[1], o_strides[2],
        l_strides[0], l_strides[1], l_strides[2], block_tables.stride(0),
        scale * _LOG2E, 0 if sliding_window is None else sliding_window, num_tiles, num_kv_heads, num_splits,
        max(1, min_split_keys // WS_PAGE),
        HEAD_DIM=head_dim, G=g, BLOCK_Q=block_q, USE_WINDOW=sliding_window is not None, STRIDED=strided_splits,
        num_warps=4, maxnreg=WS_MAXNREG,
    )  # fmt: skip
    if num_splits > 1:
        assert merge_rows is not None
        merge_splits(o_ws, l_ws, out, lse, merge_rows, num_splits)
