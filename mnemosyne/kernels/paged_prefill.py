"""Query tiles and the online-softmax steps over paged keys shared by the chunk kernel.

`plan_query_tiles` cuts the sequences' queries into tiles of at most block_q tokens;
`kv_steps` runs BLOCK_N-key steps of the online softmax for one tile x one KV head,
gathering each key through the block table (a step may span pages). The kernel that
launches them, its index invariants and its split-KV merge are in
`chunk_splitkv_attention.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def default_block_q(num_queries_per_kv: int, dtype: torch.dtype) -> int:
    """Query tokens per tile: M = block_q * heads-per-KV-head about 128 (16-bit) or 32 (fp32)."""
    return max(1, (128 if dtype.itemsize <= 2 else 32) // num_queries_per_kv)


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
