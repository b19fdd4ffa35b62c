"""Query tiles and the online-softmax steps over paged keys shared by the chunk kernels.

`plan_query_tiles` cuts the sequences' queries into tiles of at most block_q tokens. In a
kernel, `query_tile` loads one tile x one KV head, `tile_step_range` gives the key steps
of one split and where the mask is needed, and `store_tile` writes the normalised result
and its LSE; both chunk kernels (`chunk_splitkv_attention.py`, whose docstring draws the
index invariants, and `chunk_tma_attention.py`) are built from them. `kv_steps` runs
BLOCK_N-key steps of the online softmax gathering each key through the block table (a
step may span pages).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mnemosyne.kernels.host_math import chunk_tile_tokens

_LN2 = tl.constexpr(0.6931471805599453)


def default_block_q(num_queries_per_kv: int, dtype: torch.dtype) -> int:
    """Query tokens per tile: M = block_q * heads-per-KV-head about 128 (16-bit) or 32 (fp32)."""
    return chunk_tile_tokens(num_queries_per_kv, dtype.itemsize)


def plan_query_tiles(query_lens: list[int], seq_ids: list[int], block_q: int) -> tuple[list[int], list[int]]:
    """For the sequences `seq_ids` (indices into the batch), the query tiles of at most block_q
    query tokens: (tile_seq, tile_q_offset) — sequence index and first query offset within that
    sequence of each tile. Sequences with query_len 0 get no tile. A sequence's tiles are
    listed last first (its later queries see the most keys: the longest programs start first)."""
    if block_q <= 0:
        raise ValueError(f"block_q must be positive, got {block_q}")
    tile_seq: list[int] = []
    tile_q_offset: list[int] = []
    for s in seq_ids:
        offsets = range(0, query_lens[s], block_q)
        tile_seq.extend([s] * len(offsets))
        tile_q_offset.extend(reversed(offsets))
    return tile_seq, tile_q_offset


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    if INTERPRET:  # the interpreter would multiply bfloat16 as raw uint16: go through float32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _kv_step(
    acc, l_i, m_i,  # [BLOCK_M, BLOCK_D], [BLOCK_M], [BLOCK_M] float32: output sum, exp2 sum, max (log2 units)
    q, q_rel,  # [BLOCK_M, BLOCK_D] queries, [BLOCK_M] int32 query position - kv_start
    n0, hi, window,  # first local key index of this step; end of the keys the tile walks
    bt_row_ptr, stride_btb,  # block table row of the sequence
    k_head_ptr, v_head_ptr,  # k_cache / v_cache + kv_head * stride_h
    stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
    qk_scale,  # scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    MASKED: tl.constexpr, USE_WINDOW: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over BLOCK_N keys (gathered per key through the block table)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] local key indices
    offs_d = tl.arange(0, BLOCK_D)
    if MASKED:
        n_valid = offs_n < hi
        page = tl.load(bt_row_ptr + (offs_n // PAGE) * stride_btb, mask=n_valid, other=0)
        k_mask = n_valid[None, :] & (offs_d[:, None] < HEAD_DIM)  # [BLOCK_D, BLOCK_N]
        v_mask = n_valid[:, None] & (offs_d[None, :] < HEAD_DIM)  # [BLOCK_N, BLOCK_D]
    else:
        page = tl.load(bt_row_ptr + (offs_n // PAGE) * stride_btb)
        k_mask = offs_d[:, None] < HEAD_DIM
        v_mask = offs_d[None, :] < HEAD_DIM
    page = page.to(tl.int64)
    in_page = offs_n % PAGE
    k_off = page * stride_kb + in_page * stride_ks  # [BLOCK_N]
    v_off = page * stride_vb + in_page * stride_vs
    # [BLOCK_D, BLOCK_N]
    k = tl.load(k_head_ptr + k_off[None, :] + offs_d[:, None] * stride_kd, mask=k_mask, other=0.0)
    s = _dot(q, k.to(q.dtype), None, IEEE, INTERPRET) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    if MASKED:
        visible = n_valid[None, :] & (offs_n[None, :] <= q_rel[:, None])
        if USE_WINDOW:
            visible = visible & (q_rel[:, None] - offs_n[None, :] < window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
    p = tl.math.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]; 0 where masked
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    # [BLOCK_N, BLOCK_D]
    v = tl.load(v_head_ptr + v_off[:, None] + offs_d[None, :] * stride_vd, mask=v_mask, other=0.0)
    v = v.to(q.dtype)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(v.dtype), v, acc, IEEE, INTERPRET)
    return acc, l_i, m_new


@triton.jit
def kv_steps(
    acc, l_i, m_i, i0, i1, q, q_rel, lo, hi, window, bt_row_ptr, stride_btb, k_head_ptr, v_head_ptr,
    stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    MASKED: tl.constexpr, USE_WINDOW: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Steps i0 .. i1-1 of BLOCK_N keys from local key index lo (see `_kv_step`)."""
    if INTERPRET:  # the interpreter (numpy >= 2.4) cannot take a loaded scalar as a range() bound
        i = i0
        while i < i1:
            acc, l_i, m_i = _kv_step(
                acc, l_i, m_i, q, q_rel, lo + i * BLOCK_N, hi, window, bt_row_ptr, stride_btb, k_head_ptr,
                v_head_ptr, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, qk_scale,
                HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, MASKED, USE_WINDOW, IEEE, INTERPRET,
            )  # fmt: skip
            i += 1
    else:
        for i in range(i0, i1):
            acc, l_i, m_i = _kv_step(
                acc, l_i, m_i, q, q_rel, lo + i * BLOCK_N, hi, window, bt_row_ptr, stride_btb, k_head_ptr,
                v_head_ptr, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, qk_scale,
                HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, MASKED, USE_WINDOW, IEEE, INTERPRET,
            )  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def query_tile(
    q_ptr, qsl_ptr, q_pos_ptr, kv_start_ptr, kv_lens_ptr, tile_seq_ptr, tile_off_ptr,
    stride_qt, stride_qh, stride_qd, tile, kv_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, G: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Query tile `tile` x KV head `kv_head` (M = tokens x its G query heads):
    (seq, kv_len, rel0, n_q, head [BLOCK_M], rows [BLOCK_M] int64 packed rows, m_valid [BLOCK_M],
    io_mask [BLOCK_M, BLOCK_D], q [BLOCK_M, BLOCK_D], q_rel [BLOCK_M] = query position - kv_start).
    tile_seq[tile] < 0 is a padding tile (a CUDA graph's fixed grid): no query, no key, nothing
    stored."""
    seq_or_pad = tl.load(tile_seq_ptr + tile)
    live = seq_or_pad >= 0
    seq = tl.maximum(seq_or_pad, 0)
    q0 = tl.load(tile_off_ptr + tile)
    row0 = tl.load(qsl_ptr + seq)
    n_q = tl.where(live, tl.minimum(tl.load(qsl_ptr + seq + 1) - row0 - q0, BLOCK_Q), 0)
    kv_len = tl.where(live, tl.load(kv_lens_ptr + seq), 0)
    rel0 = (tl.load(q_pos_ptr + seq) - tl.load(kv_start_ptr + seq)).to(tl.int32) + q0

    offs_m = tl.arange(0, BLOCK_M)
    tok = offs_m // G  # [BLOCK_M]
    head = kv_head * G + offs_m % G
    m_valid = tok < n_q  # (implies m < BLOCK_Q * G)
    offs_d = tl.arange(0, BLOCK_D)
    rows = (row0 + q0 + tok).to(tl.int64)
    io_mask = m_valid[:, None] & (offs_d[None, :] < HEAD_DIM)  # [BLOCK_M, BLOCK_D]
    q_off = rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptr + q_off, mask=io_mask, other=0.0)
    return seq, kv_len, rel0, n_q, head, rows, m_valid, io_mask, q, rel0 + tok


@triton.jit
def tile_step_range(
    rel0, n_q, kv_len, window, split, num_splits, min_split_steps,
    BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, ALIGN_LO: tl.constexpr,
):  # fmt: skip
    """(lo, hi, i_a, i_b, s0, s1): the tile walks keys [lo, hi) in BLOCK_N steps (lo aligned
    down to BLOCK_N when ALIGN_LO); steps [0, i_a) and [i_b, n_steps) need the mask, those
    between are seen by every valid row; this split takes steps [s0, s1), splits being at
    least `min_split_steps` steps (a short sequence leaves the trailing splits empty)."""
    hi = tl.minimum(kv_len, rel0 + n_q)
    full_hi = tl.minimum(hi, rel0 + 1)  # [full_lo, full_hi): the keys every valid row sees
    lo = rel0 * 0
    full_lo = lo
    if USE_WINDOW:
        lo = tl.maximum(rel0 - window + 1, 0)
        if ALIGN_LO:
            lo = (lo // BLOCK_N) * BLOCK_N
        full_lo = tl.maximum(lo, rel0 + n_q - window)
    n_steps = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    i_a = tl.minimum(tl.cdiv(full_lo - lo, BLOCK_N), n_steps)
    i_b = tl.maximum(tl.minimum(tl.maximum(full_hi - lo, 0) // BLOCK_N, n_steps), i_a)
    per = tl.maximum(tl.cdiv(n_steps, num_splits), min_split_steps)
    s0 = tl.minimum(split * per, n_steps)
    s1 = tl.minimum(s0 + per, n_steps)
    return lo, hi, i_a, i_b, s0, s1


@triton.jit
def store_tile(
    acc, l_i, m_i, o_ptr, l_ptr, rows, head, split, io_mask, m_valid,
    stride_ot, stride_oh, stride_os, stride_od, stride_lt, stride_lh, stride_ls,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Write the tile's normalised output and natural-log LSE (0 and -inf where a row saw no key)."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * _LN2, float("-inf"))
    offs_d = tl.arange(0, BLOCK_D)
    o_off = (
        rows[:, None] * stride_ot
        + head[:, None] * stride_oh
        + split * stride_os
        + offs_d[None, :] * stride_od
    )
    tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=io_mask)
    tl.store(l_ptr + rows * stride_lt + head * stride_lh + split * stride_ls, lse, mask=m_valid)
