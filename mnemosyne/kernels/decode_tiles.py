"""The key loop of one work item of the split-KV decode kernel (`decode_attention.py`, whose
docstring draws the items and the TMA boxes): an online-softmax update per tile of BLOCK_N keys,
from pointer gathers or one TMA box per tile, masked or (a box wholly inside the item's
visible keys) not."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_tile(
    start, lo, s_hi, q, m_i, l_i, acc, bt_row, k_src, v_src, col0, qk_scale,
    stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d, mask_d,
    BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of (m_i, l_i, acc) with the keys [start, start + BLOCK_N) inside
    [lo, s_hi); k_src / v_src: the KV head's cache pointers, or (USE_TMA) the 2-D views' TMA
    descriptors, this head's columns from col0. Not MASKED (TMA only): every key of the tile
    is inside [lo, s_hi)."""
    idx = start + offs_n  # [BLOCK_N] local key indices
    mask_n = (idx >= lo) & (idx < s_hi)
    if USE_TMA:  # one box of BLOCK_N slots inside the page of `start` (start < s_hi: it exists)
        page = tl.load(bt_row + start // BLOCK_SIZE)
        row0 = page * BLOCK_SIZE + start % BLOCK_SIZE
        k = k_src.load([row0, col0])  # [BLOCK_N, BLOCK_D]
    else:
        page = tl.load(bt_row + idx // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        in_page = idx % BLOCK_SIZE
        mask_kv = mask_n[:, None] & mask_d[None, :]
        k = tl.load(
            k_src + (page * stride_kb + in_page * stride_ks)[:, None] + offs_d[None, :],
            mask=mask_kv,
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
    if UPCAST:  # the interpreter's tl.dot multiplies the raw bits of bf16
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    if MASKED:
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
    # Every tile holds >= 1 visible key, so m_new is finite.
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if USE_TMA:
        v = v_src.load([row0, col0])
        if MASKED:  # the box's slots outside [lo, s_hi) may hold NaN: 0 * NaN would reach acc
            v = tl.where(mask_n[:, None], v, 0.0)
    else:
        v = tl.load(
            v_src + (page * stride_vb + in_page * stride_vs)[:, None] + offs_d[None, :],
            mask=mask_kv,
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
    p = p.to(v.dtype)  # the precision of the P @ V MMA (fp32 for fp32 inputs)
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    pv = tl.dot(p, v, input_precision=PRECISION)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def attend_range(
    s0, s1, lo, s_hi, q, m_i, l_i, acc, bt_row, k_src, v_src, col0, qk_scale,
    stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d, mask_d,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    USE_TMA: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """`attend_tile` over the tiles starting at s0, s0 + BLOCK_N, ... below s1."""
    if INTERPRET:  # the interpreter (numpy 2) cannot take tensor bounds in range()
        start = s0
        while start < s1:
            m_i, l_i, acc = attend_tile(
                start, lo, s_hi, q, m_i, l_i, acc, bt_row, k_src, v_src, col0, qk_scale,
                stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d, mask_d, BLOCK_SIZE, PRECISION,
                INTERPRET, USE_TMA, MASKED,
            )  # fmt: skip
            start += BLOCK_N
    else:
        for start in range(s0, s1, BLOCK_N):
            m_i, l_i, acc = attend_tile(
                start, lo, s_hi, q, m_i, l_i, acc, bt_row, k_src, v_src, col0, qk_scale,
                stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d, mask_d, BLOCK_SIZE, PRECISION,
                INTERPRET, USE_TMA, MASKED,
            )  # fmt: skip
    return m_i, l_i, acc


__all__ = ["attend_range", "attend_tile"]
