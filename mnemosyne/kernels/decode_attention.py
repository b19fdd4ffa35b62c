"""Flash-decoding (split-KV) attention over the paged KV cache, returning the LSE.

Each decode sequence i has one query row r = query_start_loc[i] at global position
p = q_pos_start[i]; its key j (0 <= j < kv_lens[i]) has global position kv_start[i] + j
and lives in slot block_tables[i, j // B] * B + j % B (B = block_size). For a single
query the visible keys form one interval of local indices::

    hi = clamp(p - kv_start[i] + 1, 0, kv_lens[i])          (t <= p)
    lo = max(0, p - window + 1 - kv_start[i])  or 0         (p - t < window)

Phase 1, grid (num_decode, num_kv_heads, num_splits): [lo, hi) is cut into num_splits
pieces of L keys, L a multiple of BLOCK_N, starting from lo rounded down to BLOCK_N::

    base = lo - lo % BLOCK_N
    L    = round_up(ceil((hi - base) / num_splits), BLOCK_N)
    split s: [base + s*L, min(base + (s+1)*L, hi)) intersected with [lo, hi)

    |<-------- split 0 -------->|<-------- split 1 -------->|<-- split 2 -->|   (empty splits:
    |tile|tile|tile|tile|tile|...|tile|tile| ...                          hi     lse = -inf)
       ^ BLOCK_N keys, gathered per key through the block table (may span pages)

All of this is computed in the kernel from the length tensors (graph-capturable; only
num_splits and the shapes are fixed). One program loads each K/V tile once for the
GROUP query heads sharing its KV head (packed in BLOCK_M >= 16 rows for tl.dot), runs
an fp32 online softmax in base 2 and writes a normalised partial out and its natural
LSE to a workspace [num_decode, num_heads, num_splits, (head_dim)].

Phase 2, grid (num_decode, num_heads): the exact LSE-weighted merge of the splits
(`mnemosyne.layers.attention.merge`): m = max_s lse_s, w_s = exp(lse_s - m),
out = sum w_s out_s / sum w_s, lse = m + log(sum w_s); all splits -inf -> out 0, lse -inf.
With num_splits == 1 phase 1 writes out / lse directly and phase 2 is skipped.

Under TRITON_INTERPRET (CPU tests) the tile loop is a while loop (the interpreter cannot
take tensor bounds in range() with numpy 2) and the dot operands are upcast to fp32 (its
tl.dot multiplies the raw bits of bf16); the GPU path keeps a pipelined for loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mnemosyne.kernels.merge_attn import merge_split_partials, split_merge_blocks

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
# Tuned on H200 (benchmarks/results/probes/decode_tuning_h200_2026-11-21.json): within 2% of
# the best of 96 configurations for 1x128K, 1x1M and 8x128K keys, 32/8 heads, head dim 128.
# Head dim <= 64 (half the bytes per tile) and many sequences (more programs than SMs before
# splitting) keep the earlier setting: block_n 64, 4 warps, 4 waves (3.8 / 4.1 TB/s measured
# for 1x1M keys at head dim 64 and 64x16K keys at head dim 128).
DEFAULT_BLOCK_N = 128  # 16-bit inputs, head dim > 64; otherwise 64 (fp32: register pressure)
DEFAULT_WAVES = 2  # few sequences, head dim > 64; otherwise 4
DEFAULT_NUM_WARPS = 8  # head dim > 64; otherwise 4
DEFAULT_NUM_STAGES = 2
MAX_SPLITS = 256
# Decided when the kernels are decorated, like triton.jit itself.
_INTERPRET = bool(triton.knobs.runtime.interpret)


def choose_num_splits(
    num_seqs: int,
    num_kv_heads: int,
    max_kv_len: int,
    num_sms: int,
    block_n: int = DEFAULT_BLOCK_N,
    waves: int | None = None,
    max_splits: int = MAX_SPLITS,
    head_dim: int = 128,
) -> int:
    """Splits along the KV length so that num_seqs * num_kv_heads * splits programs fill
    about `waves` waves of num_sms, never more than ceil(max_kv_len / block_n), at least 1."""
    programs = max(1, num_seqs * num_kv_heads)
    if waves is None:
        waves = DEFAULT_WAVES if head_dim > 64 and programs < num_sms else 4
    want = -(-waves * num_sms // programs)
    tiles = -(-max_kv_len // block_n)
    return max(1, min(want, tiles, max_splits))


@triton.jit
def _attend_tile(
    start, lo, s_hi, q, m_i, l_i, acc, bt_row, k_head, v_head, qk_scale,
    stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d, mask_d,
    BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of (m_i, l_i, acc) with the keys [start, start + BLOCK_N) inside [lo, s_hi)."""
    idx = start + offs_n  # [BLOCK_N] local key indices
    mask_n = (idx >= lo) & (idx < s_hi)
    page = tl.load(bt_row + idx // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
    in_page = idx % BLOCK_SIZE
    mask_kv = mask_n[:, None] & mask_d[None, :]
    k = tl.load(
        k_head + (page * stride_kb + in_page * stride_ks)[:, None] + offs_d[None, :],
        mask=mask_kv,
        other=0.0,
    )  # [BLOCK_N, BLOCK_D]
    if UPCAST:  # the interpreter's tl.dot multiplies the raw bits of bf16
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))  # [BLOCK_M, BLOCK_N], log2 units
    # Every tile holds >= 1 visible key, so m_new is finite.
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_head + (page * stride_vb + in_page * stride_vs)[:, None] + offs_d[None, :],
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
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, qsl_ptr, qpos_ptr, kv_start_ptr, kv_lens_ptr, bt_ptr, seq_ids_ptr,
    o_ptr, l_ptr,  # workspace (or out / lse when DIRECT)
    qk_scale, window, num_splits,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh, stride_os,
    stride_lt, stride_lh, stride_ls,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(seq_ids_ptr + pid_d).to(tl.int64)
    row = tl.load(qsl_ptr + seq).to(tl.int64)
    q_pos = tl.load(qpos_ptr + seq).to(tl.int64)
    kv0 = tl.load(kv_start_ptr + seq).to(tl.int64)
    kv_len = tl.load(kv_lens_ptr + seq).to(tl.int64)

    # Visible local key range [lo, hi) of this query.
    hi = tl.minimum(tl.maximum(q_pos - kv0 + 1, 0), kv_len)
    lo = hi * 0
    if HAS_WINDOW:
        lo = tl.maximum(q_pos - window + 1 - kv0, 0)
    base = lo - lo % BLOCK_N
    span = tl.where(hi > lo, hi - base, 0)  # hi <= lo: no visible key, every split empty
    per_split = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    # Local indices fit in int32 (cheaper index math in the loop).
    lo = lo.to(tl.int32)
    s_lo = (base + split * per_split).to(tl.int32)
    s_hi = tl.minimum(base + (split + 1) * per_split, hi).to(tl.int32)

    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M] query heads of this KV head
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_m
    q = tl.load(
        q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    if INTERPRET:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + seq * stride_bt
    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh
    if INTERPRET:  # the interpreter (numpy 2) cannot take tensor bounds in range()
        start = s_lo
        while start < s_hi:
            m_i, l_i, acc = _attend_tile(
                start, lo, s_hi, q, m_i, l_i, acc, bt_row, k_head, v_head, qk_scale,
                stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d, mask_d, BLOCK_SIZE, PRECISION, INTERPRET,
            )  # fmt: skip
            start += BLOCK_N
    else:
        for start in range(s_lo, s_hi, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                start, lo, s_hi, q, m_i, l_i, acc, bt_row, k_head, v_head, qk_scale,
                stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d, mask_d, BLOCK_SIZE, PRECISION, INTERPRET,
            )  # fmt: skip

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    o_row = row if DIRECT else pid_d
    o_offs = o_row * stride_ot + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(l_ptr + o_row * stride_lt + heads * stride_lh + split * stride_ls, lse, mask=mask_m)


@triton.jit
def _decode_reduce_kernel(
    wo_ptr, wl_ptr, o_ptr, l_ptr, qsl_ptr, seq_ids_ptr, num_splits,
    stride_wot, stride_woh, stride_wos,
    stride_wlt, stride_wlh,
    stride_ot, stride_oh, stride_lt, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(seq_ids_ptr + pid_d).to(tl.int64)
    row = tl.load(qsl_ptr + seq).to(tl.int64)
    wl_row = wl_ptr + pid_d * stride_wlt + h * stride_wlh
    wo_row = wo_ptr + pid_d * stride_wot + h * stride_woh
    out, lse = merge_split_partials(wl_row, wo_row, num_splits, stride_wos, HEAD_DIM, BLOCK_D, BLOCK_S, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    tl.store(o_ptr + row * stride_ot + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=mask_d)
    tl.store(l_ptr + row * stride_lt + h * stride_lh, lse)


def paged_decode_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    q_pos_start: torch.Tensor,  # [num_seqs] int64
    kv_start: torch.Tensor,  # [num_seqs] int64
    kv_lens: torch.Tensor,  # [num_seqs] int32
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_ids: torch.Tensor,  # [num_decode] int32, sequences with query_len 1
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], query dtype; rows qsl[seq_ids] written
    lse: torch.Tensor,  # [num_tokens, num_heads] float32; rows qsl[seq_ids] written
    scale: float,
    sliding_window: int | None,
    num_splits: int,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = DEFAULT_NUM_STAGES,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Split-KV decode attention; `workspace` = (partial out [num_decode, num_heads,
    num_splits, head_dim] fp32, partial lse [num_decode, num_heads, num_splits] fp32),
    allocated here when None (unused when num_splits == 1). Launch only: no host sync,
    capturable in a CUDA graph. Tunables (sm_90, from ptxas reports: no spills, pipelined
    cp.async loads; H200 sweep): block_n 128 (64 for fp32 inputs), num_stages 2, num_warps 8."""
    num_decode = seq_ids.shape[0]
    _, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, kv_dim = k_cache.shape
    if num_heads % num_kv_heads != 0 or kv_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"bad shapes: query {tuple(query.shape)}, k/v cache {tuple(k_cache.shape)}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    if block_n is None:
        block_n = 64 if query.dtype == torch.float32 or query.shape[2] <= 64 else DEFAULT_BLOCK_N
    if num_splits < 1 or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"need num_splits >= 1, block_n a power of two >= 16: {num_splits}, {block_n}")
    for t in (query, k_cache, v_cache, out):
        if t.stride(-1) != 1:
            raise ValueError("the last dim of query / caches / out must be contiguous")
    if num_decode == 0:
        return
    num_heads_per_kv = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    direct = num_splits == 1
    if num_warps is None:
        num_warps = DEFAULT_NUM_WARPS if query.shape[2] > 64 or query.dtype == torch.float32 else 4
    if direct:
        o_ws, l_ws = out, lse
        o_strides, l_strides = (*out.stride()[:2], 0), (*lse.stride(), 0)
    else:
        if workspace is None:
            ws_shape = (num_decode, num_heads, num_splits)
            workspace = (
                torch.empty(*ws_shape, head_dim, dtype=torch.float32, device=query.device),
                torch.empty(ws_shape, dtype=torch.float32, device=query.device),
            )
        o_ws, l_ws = workspace
        if o_ws.shape != (num_decode, num_heads, num_splits, head_dim) or l_ws.shape != o_ws.shape[:3]:
            raise ValueError(f"workspace shapes {tuple(o_ws.shape)}, {tuple(l_ws.shape)} do not fit")
        o_strides, l_strides = o_ws.stride()[:3], l_ws.stride()

    _decode_split_kernel[(num_decode, num_kv_heads, num_splits)](
        query, k_cache, v_cache, query_start_loc, q_pos_start, kv_start, kv_lens, block_tables, seq_ids,
        o_ws, l_ws,
        scale * LOG2E, sliding_window or 0, num_splits,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        *o_strides, *l_strides,
        GROUP=num_heads_per_kv, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=max(16, triton.next_power_of_2(num_heads_per_kv)), BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_WINDOW=sliding_window is not None, DIRECT=direct, INTERPRET=_INTERPRET,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # no TF32 for fp32 inputs
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if direct:
        return
    block_d, block_s, chunk = split_merge_blocks(num_splits, head_dim)
    _decode_reduce_kernel[(num_decode, num_heads)](
        o_ws, l_ws, out, lse, query_start_loc, seq_ids, num_splits,
        o_ws.stride(0), o_ws.stride(1), o_ws.stride(2),
        l_ws.stride(0), l_ws.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=block_s,
        CHUNK=chunk, num_warps=4,
    )  # fmt: skip


__all__ = ["choose_num_splits", "paged_decode_attention"]
