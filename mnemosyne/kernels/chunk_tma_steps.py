"""The loop steps of the page-aligned chunk kernel (`chunk_tma_attention`, whose docstring
draws the step / page-box invariants): a step's K/V boxes, their scores, one online-softmax
update per step over one or several pages, and the loop over a split's steps."""

from __future__ import annotations

import triton
import triton.language as tl

from mnemosyne.kernels.paged_prefill import _dot


@triton.jit
def _load_tile(
    src, row0, col0, head_ptr_off, stride_s, stride_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BOX: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    """[BOX, BLOCK_D] rows row0 .. row0 + BOX - 1 (slots of one page) of one KV head:
    a TMA box at (row0, col0) of the 2-D cache view, or the same elements by pointers."""
    if USE_TMA:
        return src.load([row0, col0])
    else:
        offs_n = tl.arange(0, BOX)
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = (
            src + head_ptr_off + (row0.to(tl.int64) + offs_n)[:, None] * stride_s + offs_d[None, :] * stride_d
        )
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _box_scores(
    q, q_rel,  # [BLOCK_M, BLOCK_D] queries, [BLOCK_M] int32 query position - kv_start
    b0, lo_x, hi, window,  # first local key of this box (a multiple of BOX); the tile's keys [lo_x, hi)
    bt_row_ptr, stride_btb, k_src, v_src, col0, k_head_off, v_head_off,
    stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BOX: tl.constexpr, PAGE: tl.constexpr,
    MASKED: tl.constexpr, GUARD: tl.constexpr, USE_WINDOW: tl.constexpr, USE_TMA: tl.constexpr,
    IEEE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Scores [BLOCK_M, BOX], V [BOX, BLOCK_D] and, MASKED, the rows of V to keep [BOX] of the keys
    [b0, b0 + BOX): one run inside one page (one TMA box each for K and V). MASKED: scores in
    log2 units, -inf where not visible; V rows past kv_len are to be zeroed (`_box_v`). GUARD (masked multi-page steps): a box holding no key in
    [lo_x, hi) (a page past kv_len or wholly before the window) reads page 0 instead of
    looking its page up, and none of its V rows is kept. Unmasked: raw q.k."""
    bt_off = (b0 // PAGE) * stride_btb
    if GUARD:
        needed = (b0 < hi) & (b0 + BOX > lo_x)
        page = tl.load(bt_row_ptr + bt_off, mask=needed, other=0)
    else:
        page = tl.load(bt_row_ptr + bt_off)
    row0 = page * PAGE + b0 % PAGE
    k = _load_tile(k_src, row0, col0, k_head_off, stride_ks, stride_kd, HEAD_DIM, BLOCK_D, BOX, USE_TMA)
    s = _dot(q, tl.trans(k.to(q.dtype)), None, IEEE, INTERPRET)  # [BLOCK_M, BOX], raw scores
    v = _load_tile(v_src, row0, col0, v_head_off, stride_vs, stride_vd, HEAD_DIM, BLOCK_D, BOX, USE_TMA)
    if MASKED:
        offs_n = b0 + tl.arange(0, BOX)  # [BOX] local key indices
        n_valid = offs_n < hi
        visible = n_valid[None, :] & (offs_n[None, :] <= q_rel[:, None])
        if USE_WINDOW:
            visible = visible & (q_rel[:, None] - offs_n[None, :] < window)
        s = tl.where(visible, s * qk_scale, float("-inf"))  # log2 units
        if GUARD:
            n_valid = n_valid & needed
    else:
        n_valid = b0 < hi  # unused: every row of an unmasked box is kept
    return s, v, n_valid


@triton.jit
def _box_v(v, keep, dtype: tl.constexpr, MASKED: tl.constexpr):
    """One box's V [BOX, BLOCK_D] in `dtype`, rows not kept zeroed (slots past kv_len may hold NaN)."""
    if MASKED:
        v = tl.where(keep[:, None], v, 0.0)
    return v.to(dtype)


@triton.jit
def _box_probs(s, m_safe, qk_scale, MASKED: tl.constexpr):
    """P = exp2(scores - m) [BLOCK_M, BOX] of one box's scores (`_box_scores`); 0 where masked."""
    if MASKED:
        return tl.math.exp2(s - m_safe[:, None])
    else:
        return tl.math.exp2(s * qk_scale - m_safe[:, None])


@triton.jit
def _box_pv(
    acc, s, v, m_safe, qk_scale, MASKED: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """(acc + P @ V, row sums of P) for one box (acc already rescaled, V from `_box_v`)."""
    p = _box_probs(s, m_safe, qk_scale, MASKED)
    acc = _dot(p.to(v.dtype), v, acc, IEEE, INTERPRET)
    return acc, tl.sum(p, 1)


@triton.jit
def _tile_step(
    acc, l_i, m_i,  # [BLOCK_M, BLOCK_D], [BLOCK_M], [BLOCK_M] float32: output sum, exp2 sum, max (log2 units)
    q, q_rel,  # [BLOCK_M, BLOCK_D] queries, [BLOCK_M] int32 query position - kv_start
    n0, lo_x, hi, window,  # first local key of this step (lo + a multiple of BLOCK_N); the tile's keys [lo_x, hi)
    bt_row_ptr, stride_btb, k_src, v_src, col0, k_head_off, v_head_off,
    stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BOX: tl.constexpr, NUM_BOXES: tl.constexpr,
    PAGE: tl.constexpr, MASKED: tl.constexpr, USE_WINDOW: tl.constexpr, USE_TMA: tl.constexpr,
    IEEE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over BLOCK_N = NUM_BOXES x BOX keys: NUM_BOXES (1 .. 4) score
    tiles, one running max and one rescale of acc for all of them, NUM_BOXES P @ V products."""
    GUARD: tl.constexpr = MASKED and NUM_BOXES > 1
    s0, v0, keep0 = _box_scores(
        q, q_rel, n0, lo_x, hi, window, bt_row_ptr, stride_btb, k_src, v_src, col0, k_head_off, v_head_off,
        stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
        HEAD_DIM, BLOCK_D, BOX, PAGE, MASKED, GUARD, USE_WINDOW, USE_TMA, IEEE, INTERPRET,
    )  # fmt: skip
    s_max = s0  # [BLOCK_M, BOX]: the boxes' element-wise max, then one row reduction
    if NUM_BOXES > 1:
        v0 = _box_v(v0, keep0, q.dtype, MASKED)  # several boxes: each V made ready as it arrives
        s1, v1, keep1 = _box_scores(
            q, q_rel, n0 + BOX, lo_x, hi, window, bt_row_ptr, stride_btb, k_src, v_src, col0, k_head_off,
            v_head_off, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
            HEAD_DIM, BLOCK_D, BOX, PAGE, MASKED, GUARD, USE_WINDOW, USE_TMA, IEEE, INTERPRET,
        )  # fmt: skip
        s_max = tl.maximum(s_max, s1)
        v1 = _box_v(v1, keep1, q.dtype, MASKED)
    if NUM_BOXES > 2:
        s2, v2, keep2 = _box_scores(
            q, q_rel, n0 + 2 * BOX, lo_x, hi, window, bt_row_ptr, stride_btb, k_src, v_src, col0, k_head_off,
            v_head_off, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
            HEAD_DIM, BLOCK_D, BOX, PAGE, MASKED, GUARD, USE_WINDOW, USE_TMA, IEEE, INTERPRET,
        )  # fmt: skip
        s_max = tl.maximum(s_max, s2)
        v2 = _box_v(v2, keep2, q.dtype, MASKED)
    if NUM_BOXES > 3:
        s3, v3, keep3 = _box_scores(
            q, q_rel, n0 + 3 * BOX, lo_x, hi, window, bt_row_ptr, stride_btb, k_src, v_src, col0, k_head_off,
            v_head_off, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
            HEAD_DIM, BLOCK_D, BOX, PAGE, MASKED, GUARD, USE_WINDOW, USE_TMA, IEEE, INTERPRET,
        )  # fmt: skip
        s_max = tl.maximum(s_max, s3)
        v3 = _box_v(v3, keep3, q.dtype, MASKED)
    if MASKED:
        m_new = tl.maximum(m_i, tl.max(s_max, 1))  # [BLOCK_M]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
    else:  # every valid row sees every key (padded rows have q = 0): the max is finite
        m_new = tl.maximum(m_i, tl.max(s_max, 1) * qk_scale)
        m_safe = m_new
    if NUM_BOXES == 1:  # the single-page order (fewest registers for one box)
        p0 = _box_probs(s0, m_safe, qk_scale, MASKED)
        v0 = _box_v(v0, keep0, q.dtype, MASKED)
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p0, 1)
        acc = acc * alpha[:, None]
        acc = _dot(p0.to(v0.dtype), v0, acc, IEEE, INTERPRET)
    else:  # rescale first, then each box's P is made and used at once (fewest registers for several)
        alpha = tl.math.exp2(m_i - m_safe)
        acc = acc * alpha[:, None]
        acc, l_new = _box_pv(acc, s0, v0, m_safe, qk_scale, MASKED, IEEE, INTERPRET)
        acc, l_box = _box_pv(acc, s1, v1, m_safe, qk_scale, MASKED, IEEE, INTERPRET)
        l_new += l_box
        if NUM_BOXES > 2:
            acc, l_box = _box_pv(acc, s2, v2, m_safe, qk_scale, MASKED, IEEE, INTERPRET)
            l_new += l_box
        if NUM_BOXES > 3:
            acc, l_box = _box_pv(acc, s3, v3, m_safe, qk_scale, MASKED, IEEE, INTERPRET)
            l_new += l_box
        l_i = l_i * alpha + l_new
    return acc, l_i, m_new


@triton.jit
def tile_steps(
    acc, l_i, m_i, i0, i1, q, q_rel, lo, lo_x, hi, window, bt_row_ptr, stride_btb, k_src, v_src, col0,
    k_head_off, v_head_off, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BOX: tl.constexpr, NUM_BOXES: tl.constexpr,
    PAGE: tl.constexpr, MASKED: tl.constexpr, USE_WINDOW: tl.constexpr, USE_TMA: tl.constexpr,
    IEEE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Steps i0 .. i1-1 of BLOCK_N = NUM_BOXES x BOX keys from local key lo (a multiple of BLOCK_N)."""
    if INTERPRET:  # the interpreter (numpy >= 2.4) cannot take a loaded scalar as a range() bound
        i = i0
        while i < i1:
            acc, l_i, m_i = _tile_step(
                acc, l_i, m_i, q, q_rel, lo + i * (NUM_BOXES * BOX), lo_x, hi, window, bt_row_ptr, stride_btb,
                k_src, v_src, col0, k_head_off, v_head_off, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
                HEAD_DIM, BLOCK_D, BOX, NUM_BOXES, PAGE, MASKED, USE_WINDOW, USE_TMA, IEEE, INTERPRET,
            )  # fmt: skip
            i += 1
    else:
        for i in tl.range(i0, i1):
            acc, l_i, m_i = _tile_step(
                acc, l_i, m_i, q, q_rel, lo + i * (NUM_BOXES * BOX), lo_x, hi, window, bt_row_ptr, stride_btb,
                k_src, v_src, col0, k_head_off, v_head_off, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
                HEAD_DIM, BLOCK_D, BOX, NUM_BOXES, PAGE, MASKED, USE_WINDOW, USE_TMA, IEEE, INTERPRET,
            )  # fmt: skip
    return acc, l_i, m_i
