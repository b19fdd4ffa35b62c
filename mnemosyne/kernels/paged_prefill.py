"""Triton attention over the paged KV cache for prefill chunks (any query length), with the LSE.

Same semantics as `TorchReferenceBackend.forward` (see `AttentionMetadata`), for the
sequences covered by a list of query tiles. One program = one query tile x one KV head,
grid (num_tiles, num_kv_heads)::

    tile k: sequence s = tile_seq[k], first query offset q0 = tile_q_offset[k]
            tokens  u = 0 .. n_q-1,  n_q = min(BLOCK_Q, query_len[s] - q0)
            packed query row r = qsl[s] + q0 + u, global position p = q_pos_start[s] + q0 + u

    M dim: the G = num_heads // num_kv_heads query heads of KV head g under each token
            m = u * G + h   ->  token u = m // G, query head g * G + h
            (M = BLOCK_Q * G, padded to a power of two >= 16; padded rows are never stored)

    key j (0 <= j < kv_len[s]): global position kv_start[s] + j,
            cache slot block_tables[s, j // B] * B + j % B  (gathered per key: a KV tile may span pages)

    row m sees key j  iff  kv_start + j <= p  and (no window or p - (kv_start + j) < W)

Local coordinates: rel = p - kv_start (the last key index row m may see). A tile only
walks keys [lo, hi): hi = min(kv_len, last rel + 1), lo = max(0, first rel - W + 1) with
a window, else 0, in BLOCK_N steps; steps wholly inside the keys every row sees skip
the mask::

    lo .. masked head (window edge) .. | .. fully visible, unmasked .. | .. masked tail (diagonal) .. hi

Online softmax in float32 with exp2 of log2(e)-scaled scores; the LSE is returned in
natural log. Rows that see no key get out = 0 and lse = -inf. Rows of sequences not
covered by a tile are not touched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)


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
def _kv_steps(
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
def _paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,  # see paged_prefill_attention
    qsl_ptr, q_pos_ptr, kv_start_ptr, kv_lens_ptr, bt_ptr, tile_seq_ptr, tile_off_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_lt, stride_lh,
    stride_bts, stride_btb,
    qk_scale, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # head_dim, padded to a power of two >= 16
    G: tl.constexpr,  # query heads per KV head
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,  # block_size of the cache
    USE_WINDOW: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    q0 = tl.load(tile_off_ptr + tile)
    row0 = tl.load(qsl_ptr + seq)
    n_q = tl.minimum(tl.load(qsl_ptr + seq + 1) - row0 - q0, BLOCK_Q)
    kv_len = tl.load(kv_lens_ptr + seq)
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
    q_rel = rel0 + tok  # [BLOCK_M]

    # Keys this tile walks, [lo, hi), and the part every valid row sees, [full_lo, full_hi).
    hi = tl.minimum(kv_len, rel0 + n_q)
    full_hi = tl.minimum(hi, rel0 + 1)
    lo = rel0 * 0
    full_lo = lo
    if USE_WINDOW:
        lo = tl.maximum(rel0 - window + 1, 0)
        full_lo = tl.maximum(lo, rel0 + n_q - window)
    n_steps = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    i_a = tl.minimum(tl.cdiv(full_lo - lo, BLOCK_N), n_steps)
    i_b = tl.maximum(tl.minimum(tl.maximum(full_hi - lo, 0) // BLOCK_N, n_steps), i_a)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bts
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh
    # Steps [0, i_a): masked (window edge), [i_a, i_b): fully visible, [i_b, n_steps): masked.
    acc, l_i, m_i = _kv_steps(
        acc, l_i, m_i, 0, i_a, q, q_rel, lo, hi, window, bt_row, stride_btb, k_head, v_head,
        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, True, USE_WINDOW, IEEE, INTERPRET,
    )  # fmt: skip
    acc, l_i, m_i = _kv_steps(
        acc, l_i, m_i, i_a, i_b, q, q_rel, lo, hi, window, bt_row, stride_btb, k_head, v_head,
        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, False, USE_WINDOW, IEEE, INTERPRET,
    )  # fmt: skip
    acc, l_i, m_i = _kv_steps(
        acc, l_i, m_i, i_b, n_steps, q, q_rel, lo, hi, window, bt_row, stride_btb, k_head, v_head,
        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, True, USE_WINDOW, IEEE, INTERPRET,
    )  # fmt: skip

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * _LN2, float("-inf"))
    o_off = rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
    tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=io_mask)
    tl.store(lse_ptr + rows * stride_lt + head * stride_lh, lse, mask=m_valid)


def paged_prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
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
    block_q: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> None:
    """Attention of the tiles' query rows over the keys held in the paged cache; writes
    `out` and `lse` (natural log, -inf where a row sees no key) for those rows only.

    block_q must equal the one given to `plan_query_tiles`; None means
    `default_block_q(num_heads // num_kv_heads, query.dtype)`. block_n / num_warps /
    num_stages None: chosen from the dtype and tile size (checked for register spills on
    sm_90 with ptxas, not timed)."""
    num_tokens, num_heads, head_dim = query.shape
    _, page, num_kv_heads, kv_head_dim = k_cache.shape
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
    if kv_head_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"cache shapes {tuple(k_cache.shape)}, {tuple(v_cache.shape)} vs head_dim {head_dim}"
        )
    if out.shape != query.shape or out.dtype != query.dtype:
        raise ValueError(f"out must be {tuple(query.shape)} {query.dtype}")
    if lse.shape != (num_tokens, num_heads) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be ({num_tokens}, {num_heads}) float32")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    num_tiles = tile_seq.shape[0]
    if num_tiles == 0 or num_tokens == 0:
        return
    group = num_heads // num_kv_heads
    half = query.element_size() <= 2
    if block_q is None:
        block_q = default_block_q(group, query.dtype)
    block_m = max(16, triton.next_power_of_2(block_q * group))
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = max(16, triton.next_power_of_2(block_n or (64 if half else 32)))
    if num_warps is None:
        num_warps = 4 if half and block_m * block_d < 128 * 128 else 8
    if num_stages is None:
        num_stages = 3 if half else 2
    _paged_prefill_kernel[(num_tiles, num_kv_heads)](
        query, k_cache, v_cache, out, lse,
        query_start_loc, q_pos_start, kv_start, kv_lens, block_tables, tile_seq, tile_q_offset,
        *query.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *lse.stride(),
        *block_tables.stride(),
        scale * _LOG2E,
        0 if sliding_window is None else sliding_window,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        G=group,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PAGE=page,
        USE_WINDOW=sliding_window is not None,
        IEEE=query.dtype == torch.float32,
        INTERPRET=triton.knobs.runtime.interpret,
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
