"""Flash-decoding (split-KV) attention over the paged KV cache, returning the LSE.

Phase 1, grid (max_items, num_kv_heads): one program per work item of the batch
(`decode_items.py`: how the batch's visible keys are cut into about `split_budget` items).
One program loads each K/V tile once for the GROUP query heads sharing its KV head (packed
in BLOCK_M >= 16 rows for tl.dot), runs an fp32 online softmax in base 2 and writes a
normalised partial out and its natural LSE to a workspace [num_heads, max_items, (head_dim)].

A sequence of one item (n_i = 1: every sequence of a batch whose keys fill the GPU without
splitting, e.g. 32 decodes at 1-2K keys) needs no merge: phase 1 writes that item's result
straight to its query row of out / lse, and phase 2 skips it. Other items go to the
workspace. (The merge of one item is a copy; done by phase 2 it cost 13 us per layer at
S = 33: 32 decodes at 1.1K keys, 8B heads, H200.)

Phase 2, grid (num_decode, num_heads / 2): the exact LSE-weighted merge of a sequence's n_i >= 2
items (`mnemosyne.layers.attention.merge`): m = max_k lse_k, w_k = exp(lse_k - m),
out = sum w_k out_k / sum w_k, lse = m + log(sum w_k); all items -inf -> out 0, lse -inf.
With S == 1 every sequence is one item: phase 2 is not launched.

K/V tiles are gathered by pointers from each key's page, or (`use_tma`: every tile one run of
BLOCK_N slots inside one page, BLOCK_N dividing block_size) loaded as TMA boxes of the 2-D
cache view [num_blocks * block_size, num_kv_heads * head_dim] at (page * block_size + start %
block_size, kv_head * head_dim): tile starts are multiples of BLOCK_N (`decode_items`), so a
tile never crosses a page. A box also reads the page's slots outside [lo, hi); only a work
item's first and last tiles can hold such slots, and only they are masked: their scores set
to -inf and their V rows zeroed (unused slots may hold NaN). Pointer gathers mask every tile.

    item's keys          lo                                       s_hi
    tiles        |head tile|  whole tiles (no mask)  ...  |tail tile|
                 s_lo      a                                b

Under TRITON_INTERPRET (CPU tests) the tile loop is a while loop (the interpreter cannot
take tensor bounds in range() with numpy 2) and the dot operands are upcast to fp32 (its
tl.dot multiplies the raw bits of bf16); the GPU path keeps a pipelined for loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from mnemosyne.kernels.decode_items import decode_workspace_items, seq_block, visible_span, work_items
from mnemosyne.kernels.decode_launch import fits_boxes, launch_options
from mnemosyne.kernels.decode_tiles import attend_range
from mnemosyne.kernels.host_math import next_power_of_2
from mnemosyne.kernels.merge_attn import merge_row_splits

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)


# Phase 2: (heads per program, items per step of its loop). A batch of a few sequences gives
# each many items (one 131K-key decode at head dim 128: 33), which 2-head programs read in
# 5 dependent steps of 8 (9.2 us a layer); one head per program and 32 items per step read
# them in 2 steps with twice the programs (4.6 us; 32 decodes of 1.1K keys: 2.5 us with the
# other shape; benchmarks/results/session13_h200x2_2026-11-30/d, H200).
REDUCE_SHAPE_MANY = (2, 8)
REDUCE_SHAPE_FEW = (1, 32)
MAX_FEW_DECODES = 4
# Decided when the kernels are decorated, like triton.jit itself.
_INTERPRET = bool(triton.knobs.runtime.interpret)


# The decode count, the block table's width and the workspace strides (its rows follow the
# decode count) change from step to step (tests/test_no_recompile.py).
@triton.jit(do_not_specialize=[
    "num_decode", "stride_bt", "stride_or", "stride_oh", "stride_lr", "stride_lh", "stride_out_t", "stride_lse_t",
])  # fmt: skip
def _decode_split_kernel(
    q_ptr, k_src, v_src,  # the caches, or (USE_TMA) TMA descriptors of their 2-D views
    qsl_ptr, qpos_ptr, kv_start_ptr, kv_lens_ptr, bt_ptr, seq_ids_ptr,
    o_ptr, l_ptr,  # the workspace (unused when DIRECT: every sequence is one item)
    out_ptr, lse_ptr,  # out / lse: a sequence of one item is written here directly
    qk_scale, window, num_decode, split_budget,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_or, stride_oh,  # r: the item's row of the workspace
    stride_lr, stride_lh,
    stride_out_t, stride_out_h, stride_lse_t, stride_lse_h,  # out / lse (t: the query row)
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SEQ_BLOCK: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    item = tl.program_id(0)
    kvh = tl.program_id(1)
    # Past every item, known without the batch scan: there are at most split_budget items
    # beyond one per real entry, and padding follows the real entries, so a padding entry
    # at item - split_budget means item >= split_budget + (real entries) >= the item count.
    # A CUDA graph's padded list (a mixed step of T tokens has T entries, most of them
    # padding) would otherwise run T scans of T entries per KV head and layer.
    j = item - split_budget
    pad = tl.load(seq_ids_ptr + tl.maximum(j, 0), mask=(j >= 0) & (j < num_decode), other=0)
    if pad < 0:
        return
    if DIRECT:  # one item per sequence: item = its index in seq_ids
        i = item
        k = 0
        split_keys = 0
        single = True
    else:
        n, first, split_keys = work_items(
            qpos_ptr, kv_start_ptr, kv_lens_ptr, seq_ids_ptr, num_decode, split_budget, window,
            HAS_WINDOW, BLOCK_N, SEQ_BLOCK,
        )  # fmt: skip
        offs = tl.arange(0, SEQ_BLOCK)
        i = tl.sum((((first + n) <= item) & (offs < num_decode)).to(tl.int32), 0)  # the item's sequence
        k = item - tl.sum(tl.where(offs == i, first, 0), 0)  # its index among that sequence's items
        n_i = tl.sum(tl.where(offs == i, n, 0), 0)
        single = n_i == 1  # its only item: no merge needed
        last = k == n_i - 1  # it runs to hi (a short tail joins it)
    seq = tl.load(seq_ids_ptr + i, mask=i < num_decode, other=-1).to(tl.int64)
    if seq >= 0:  # else past the last item, or a padding entry
        row = tl.load(qsl_ptr + seq).to(tl.int64)
        lo, hi, base = visible_span(qpos_ptr, kv_start_ptr, kv_lens_ptr, seq, window, HAS_WINDOW, BLOCK_N)
        if DIRECT:
            s_lo = base
            s_hi = hi
        else:
            s_lo = base + k * split_keys
            s_hi = tl.where(last, hi, tl.minimum(s_lo + split_keys, hi))
        # Local indices fit in int32 (cheaper index math in the loop).
        lo = lo.to(tl.int32)
        s_lo = s_lo.to(tl.int32)
        s_hi = s_hi.to(tl.int32)

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
        col0 = kvh * HEAD_DIM  # this head's columns of the descriptors' 2-D views (USE_TMA)
        if USE_TMA:
            k_head = k_src
            v_head = v_src
            # A box needs no mask inside [lo, s_hi): [s_lo, a) the head tile (keys before lo),
            # [a, b) whole tiles, [b, s_hi) the tail tile; at most one tile each end.
            a = tl.where(s_lo < lo, tl.minimum(s_lo + BLOCK_N, s_hi), s_lo)
            b = tl.maximum(a, s_hi - s_hi % BLOCK_N)
            m_i, l_i, acc = attend_range(
                s_lo, a, lo, s_hi, q, m_i, l_i, acc, bt_row, k_head, v_head, col0, qk_scale,
                stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d, mask_d,
                BLOCK_N, BLOCK_SIZE, PRECISION, INTERPRET, USE_TMA, True,
            )  # fmt: skip
            m_i, l_i, acc = attend_range(
                a, b, lo, s_hi, q, m_i, l_i, acc, bt_row, k_head, v_head, col0, qk_scale,
                stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d, mask_d,
                BLOCK_N, BLOCK_SIZE, PRECISION, INTERPRET, USE_TMA, False,
            )  # fmt: skip
            m_i, l_i, acc = attend_range(
                b, s_hi, lo, s_hi, q, m_i, l_i, acc, bt_row, k_head, v_head, col0, qk_scale,
                stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d, mask_d,
                BLOCK_N, BLOCK_SIZE, PRECISION, INTERPRET, USE_TMA, True,
            )  # fmt: skip
        else:  # pointer gathers: every tile masked
            k_head = k_src + kvh * stride_kh
            v_head = v_src + kvh * stride_vh
            m_i, l_i, acc = attend_range(
                s_lo, s_hi, lo, s_hi, q, m_i, l_i, acc, bt_row, k_head, v_head, col0, qk_scale,
                stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d, mask_d,
                BLOCK_N, BLOCK_SIZE, PRECISION, INTERPRET, USE_TMA, True,
            )  # fmt: skip

        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
        mask_md = mask_m[:, None] & mask_d[None, :]
        # (no name is bound in both branches: Triton needs such names to agree in type)
        if single:  # the sequence's only item is its result: the query row of out / lse
            tl.store(
                out_ptr + row * stride_out_t + heads[:, None] * stride_out_h + offs_d[None, :],
                out.to(out_ptr.dtype.element_ty), mask=mask_md,
            )  # fmt: skip
            tl.store(lse_ptr + row * stride_lse_t + heads * stride_lse_h, lse, mask=mask_m)
        else:  # a partial: the item's row of the workspace, merged by phase 2
            tl.store(
                o_ptr + item * stride_or + heads[:, None] * stride_oh + offs_d[None, :],
                out.to(o_ptr.dtype.element_ty), mask=mask_md,
            )  # fmt: skip
            tl.store(l_ptr + item * stride_lr + heads * stride_lh, lse, mask=mask_m)


@triton.jit(do_not_specialize=["num_decode", "stride_woh", "stride_wos", "stride_wlh"])
def _decode_reduce_kernel(
    wo_ptr, wl_ptr, o_ptr, l_ptr, qsl_ptr, qpos_ptr, kv_start_ptr, kv_lens_ptr, seq_ids_ptr,
    num_decode, num_heads, split_budget, window,
    stride_woh, stride_wos,
    stride_wlh,  # the items of a head are contiguous (stride 1)
    stride_ot, stride_oh, stride_lt, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr, SEQ_BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Sequence i's n_i >= 2 items for BLOCK_H heads, CHUNK items per step of a runtime loop
    (`merge_attn.merge_row_splits`, as the chunk kernels' merge): the cost follows n_i, not
    the budget."""
    i = tl.program_id(0)
    if tl.load(seq_ids_ptr + i) < 0:  # a padding entry: no row (and no batch scan)
        return
    n, first, _ = work_items(
        qpos_ptr, kv_start_ptr, kv_lens_ptr, seq_ids_ptr, num_decode, split_budget, window,
        HAS_WINDOW, BLOCK_N, SEQ_BLOCK,
    )  # fmt: skip
    offs = tl.arange(0, SEQ_BLOCK)
    n_i = tl.sum(tl.where(offs == i, n, 0), 0)
    first_i = tl.sum(tl.where(offs == i, first, 0), 0).to(tl.int64)
    seq = tl.load(seq_ids_ptr + i).to(tl.int64)
    if (seq >= 0) & (n_i > 1):  # -1: a padding entry; one item: phase 1 wrote the result
        row = tl.load(qsl_ptr + seq).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
        mask_h = heads < num_heads
        mask_d = dims < HEAD_DIM
        wl_row = wl_ptr + heads[None, :] * stride_wlh + first_i  # [1, BLOCK_H]: item k's lse at + k
        wo_row = wo_ptr + heads[None, :, None] * stride_woh + first_i * stride_wos + dims[None, None, :]
        out, lse = merge_row_splits(
            wl_row, wo_row, n_i, stride_wos, mask_h, mask_d, BLOCK_H, BLOCK_D, CHUNK, INTERPRET
        )
        tl.store(
            o_ptr + row * stride_ot + heads[:, None] * stride_oh + dims[None, :],
            out.to(o_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :],
        )  # fmt: skip
        tl.store(l_ptr + row * stride_lt + heads * stride_lh, lse, mask=mask_h)


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
    split_budget: int,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_tma: bool = False,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Split-KV decode attention over ~`split_budget` balanced work items (the docstring);
    `use_tma`: K/V tiles as TMA boxes (`fits_boxes` must hold, the caches contiguous);
    `workspace` = (partial out [num_heads, max_items, head_dim] fp32, partial lse
    [num_heads, max_items] fp32), max_items = `decode_workspace_items`, allocated here when
    None (unused when split_budget == 1). Launch only: no host sync, capturable in a CUDA
    graph. Launch options left None take `launch_options` (H200-tuned)."""
    num_decode = seq_ids.shape[0]
    _, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, kv_dim = k_cache.shape
    if num_heads % num_kv_heads != 0 or kv_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"bad shapes: query {tuple(query.shape)}, k/v cache {tuple(k_cache.shape)}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    default = launch_options(head_dim, query.dtype)
    block_n = default[0] if block_n is None else block_n
    num_warps = default[1] if num_warps is None else num_warps
    num_stages = default[2] if num_stages is None else num_stages
    if split_budget < 1 or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"need split_budget >= 1, block_n a power of two >= 16: {split_budget}, {block_n}")
    for t in (query, k_cache, v_cache, out):
        if t.stride(-1) != 1:
            raise ValueError("the last dim of query / caches / out must be contiguous")
    if use_tma and not (
        fits_boxes(block_size, block_n, head_dim, query.device) and k_cache.is_contiguous() and v_cache.is_contiguous()
    ):
        raise ValueError(
            f"TMA K/V boxes need contiguous caches, block_n {block_n} dividing block_size {block_size}, a "
            f"power-of-two head_dim (got {head_dim}) and sm_90+"
        )
    if num_decode == 0:
        return
    num_heads_per_kv = num_heads // num_kv_heads
    block_d = max(16, next_power_of_2(head_dim))
    direct = split_budget == 1
    max_items = num_decode if direct else decode_workspace_items(num_decode, split_budget)
    if direct:  # no workspace (each sequence is one item, written to out / lse): they stand in
        o_ws, l_ws = out, lse
        o_strides, l_strides = out.stride()[:2], lse.stride()  # (row, head)
    else:
        if workspace is None:
            workspace = (
                torch.empty(num_heads, max_items, head_dim, dtype=torch.float32, device=query.device),
                torch.empty(num_heads, max_items, dtype=torch.float32, device=query.device),
            )
        o_ws, l_ws = workspace
        if o_ws.shape != (num_heads, max_items, head_dim) or l_ws.shape != o_ws.shape[:2]:
            raise ValueError(
                f"workspace shapes {tuple(o_ws.shape)}, {tuple(l_ws.shape)} do not fit "
                f"({num_heads}, {max_items}, {head_dim})"
            )
        if o_ws.stride(2) != 1 or l_ws.stride(1) != 1:
            raise ValueError("the workspace's head dim and its lse's items must be contiguous")
        o_strides, l_strides = (o_ws.stride(1), o_ws.stride(0)), (l_ws.stride(1), l_ws.stride(0))

    has_window = sliding_window is not None
    lengths = (query_start_loc, q_pos_start, kv_start, kv_lens, block_tables, seq_ids)
    k_src, v_src = k_cache, v_cache
    if use_tma:  # [num_blocks * block_size, num_kv_heads * head_dim]: one row per slot
        k_src, v_src = (
            TensorDescriptor.from_tensor(c.view(-1, num_kv_heads * head_dim), [block_n, head_dim])
            for c in (k_cache, v_cache)
        )
    _decode_split_kernel[(max_items, num_kv_heads)](
        query, k_src, v_src, *lengths,
        o_ws, l_ws, out, lse,
        scale * LOG2E, sliding_window or 0, num_decode, split_budget,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        *o_strides, *l_strides,
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        GROUP=num_heads_per_kv, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=max(16, next_power_of_2(num_heads_per_kv)), BLOCK_N=block_n, BLOCK_D=block_d,
        SEQ_BLOCK=seq_block(num_decode), HAS_WINDOW=has_window, DIRECT=direct, INTERPRET=_INTERPRET,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # no TF32 for fp32 inputs
        USE_TMA=use_tma, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if direct:
        return
    # The chunk kernels' merge loop (`merge_attn.merge_row_splits`)
    block_h, chunk = REDUCE_SHAPE_FEW if num_decode <= MAX_FEW_DECODES else REDUCE_SHAPE_MANY
    _decode_reduce_kernel[(num_decode, triton.cdiv(num_heads, block_h))](
        o_ws, l_ws, out, lse, query_start_loc, q_pos_start, kv_start, kv_lens, seq_ids,
        num_decode, num_heads, split_budget, sliding_window or 0,
        o_ws.stride(0), o_ws.stride(1),
        l_ws.stride(0),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_H=block_h, CHUNK=chunk,
        BLOCK_N=block_n, SEQ_BLOCK=seq_block(num_decode), HAS_WINDOW=has_window, INTERPRET=_INTERPRET,
        num_warps=2,
    )  # fmt: skip


__all__ = ["paged_decode_attention"]
