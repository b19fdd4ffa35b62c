"""Fused exact merges of attention partials over disjoint key sets.

`merge_attn_states_into`: two partials (one kernel). `merge_splits`: the chunk kernels'
phase 2, every covered row's splits for a block of heads per program (below), through the
jitted `merge_row_splits`, which the decode kernel's phase 2 uses too.

The same math as `mnemosyne.layers.attention.merge` (see its docstring), per row and head::

    m = max(lse_a, lse_b)   (0 when both are -inf)
    w_x = exp(lse_x - m);   out = (w_a out_a + w_b out_b) / (w_a + w_b);   lse = m + log(w_a + w_b)
    both -inf -> out 0, lse -inf;  a zero weight zeroes its partial even if it is not finite

Grid (num_tokens, cdiv(num_heads, BLOCK_H)); each program reads its rows of both partials
before writing, so `out` may be `out_a` (an in-place accumulation). Inputs and output may
have different dtypes (e.g. a float32 accumulator merged with a bf16 partial) and any
strides, with a contiguous last dim. No host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mnemosyne.kernels.host_math import cdiv, next_power_of_2


# Its inputs are views whose strides and offsets follow the step's lengths (cuDNN's outputs
# for c queries, slices at a chunk's first row): nothing is specialized on them, so no length
# compiles a new variant while serving (tests/test_no_recompile.py).
@triton.jit(
    do_not_specialize=[
        "so_t", "so_h", "sl_t", "sl_h", "sa_t", "sa_h", "sla_t", "sla_h", "sb_t", "sb_h", "slb_t", "slb_h",
    ],
    do_not_specialize_on_alignment=["o_ptr", "l_ptr", "a_ptr", "la_ptr", "b_ptr", "lb_ptr"],
)  # fmt: skip
def _merge_kernel(
    o_ptr, l_ptr, a_ptr, la_ptr, b_ptr, lb_ptr, num_heads,
    so_t, so_h, sl_t, sl_h, sa_t, sa_h, sla_t, sla_h, sb_t, sb_h, slb_t, slb_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask_h = heads < num_heads
    mask = mask_h[:, None] & (dims[None, :] < HEAD_DIM)
    la = tl.load(la_ptr + t * sla_t + heads * sla_h, mask=mask_h, other=float("-inf"))
    lb = tl.load(lb_ptr + t * slb_t + heads * slb_h, mask=mask_h, other=float("-inf"))
    a = tl.load(a_ptr + t * sa_t + heads[:, None] * sa_h + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + t * sb_t + heads[:, None] * sb_h + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    m = tl.maximum(la, lb)
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    wa = tl.exp(la - m_safe)  # [BLOCK_H]
    wb = tl.exp(lb - m_safe)
    denom = wa + wb
    num = tl.where(wa[:, None] > 0, wa[:, None] * a, 0.0) + tl.where(wb[:, None] > 0, wb[:, None] * b, 0.0)
    safe = tl.where(denom > 0, denom, 1.0)
    out = num / safe[:, None]  # [BLOCK_H, BLOCK_D]
    lse = tl.where(denom > 0, m_safe + tl.log(safe), float("-inf"))
    tl.store(
        o_ptr + t * so_t + heads[:, None] * so_h + dims[None, :], out.to(o_ptr.dtype.element_ty), mask=mask
    )
    tl.store(l_ptr + t * sl_t + heads * sl_h, lse, mask=mask_h)


def merge_attn_states_into(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], written (may be out_a)
    lse: torch.Tensor,  # [num_tokens, num_heads] float32, written (may be lse_a)
    out_a: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    lse_a: torch.Tensor,  # [num_tokens, num_heads] float32
    out_b: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    lse_b: torch.Tensor,  # [num_tokens, num_heads] float32
) -> None:
    num_tokens, num_heads, head_dim = out.shape
    if out_a.shape != out.shape or out_b.shape != out.shape:
        raise ValueError(f"shape mismatch: {tuple(out.shape)}, {tuple(out_a.shape)}, {tuple(out_b.shape)}")
    if lse.shape != (num_tokens, num_heads) or lse_a.shape != lse.shape or lse_b.shape != lse.shape:
        raise ValueError(f"lse shapes {tuple(lse.shape)}, {tuple(lse_a.shape)}, {tuple(lse_b.shape)}")
    if any(x.stride(-1) != 1 for x in (out, out_a, out_b)):
        raise ValueError("the last dim of every output must be contiguous")
    if num_tokens == 0:
        return
    block_h = min(next_power_of_2(num_heads), 8)
    _merge_kernel[(num_tokens, cdiv(num_heads, block_h))](
        out, lse, out_a, lse_a, out_b, lse_b, num_heads,
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        out_a.stride(0), out_a.stride(1), lse_a.stride(0), lse_a.stride(1),
        out_b.stride(0), out_b.stride(1), lse_b.stride(0), lse_b.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), BLOCK_H=block_h,
    )  # fmt: skip


# The chunk kernels' phase 2. One program = one covered row x BLOCK_H heads; it walks the
# splits CHUNK at a time (a runtime loop: num_splits is not specialized, so no split count
# compiles a variant while serving) with the running max of the online softmax::
#
#     m' = max(m, max_s lse_s),  a = exp(m - m'),  w_s = exp(lse_s - m')
#     acc = a acc + sum_s w_s out_s,   den = a den + sum_s w_s;   out = acc / den, lse = m' + log den
#
# An empty split (lse -inf, its output never written) weighs 0 and is not read. The first
# version (one row and head per program, a static loop to MAX_SPLITS splits) took 0.52 ms
# per layer to merge a 2340-token prompt's 2 splits (1B shape, H200, 2026-11-30), 3.5x the
# attention itself: its cost grew with rows x heads, whatever the split count.
@triton.jit
def merge_split_chunk(
    m, den, acc, c, wl_row, wo_row, num_splits, stride_wos, mask_h, mask_d, CHUNK: tl.constexpr
):  # fmt: skip
    """Splits [c * CHUNK, (c + 1) * CHUNK) into the running (m, den, acc) of BLOCK_H heads:
    split s's lse at wl_row + s ([1, BLOCK_H] pointers), its output at wo_row + s * stride_wos
    ([1, BLOCK_H, BLOCK_D] pointers)."""
    s = c * CHUNK + tl.arange(0, CHUNK)  # [CHUNK]
    ok = (s[:, None] < num_splits) & mask_h[None, :]  # [CHUNK, BLOCK_H]
    lses = tl.load(wl_row + s[:, None], mask=ok, other=float("-inf"))  # [CHUNK, BLOCK_H]
    m_new = tl.maximum(m, tl.max(lses, 0))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # all -inf so far: every weight 0
    alpha = tl.exp(m - m_safe)  # [BLOCK_H]; m = -inf -> 0
    w = tl.exp(lses - m_safe[None, :])  # [CHUNK, BLOCK_H]
    part = tl.load(
        wo_row + s[:, None, None] * stride_wos, mask=(w[:, :, None] > 0) & mask_d[None, None, :], other=0.0
    )  # [CHUNK, BLOCK_H, BLOCK_D]
    acc = acc * alpha[:, None] + tl.sum(tl.where(w[:, :, None] > 0, w[:, :, None] * part, 0.0), 0)
    return m_new, den * alpha + tl.sum(w, 0), acc


@triton.jit
def merge_row_splits(
    wl_row, wo_row, num_splits, stride_wos, mask_h, mask_d,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """(out [BLOCK_H, BLOCK_D] float32, lse [BLOCK_H]) of one row's num_splits partials for
    BLOCK_H heads (pointers as `merge_split_chunk`), CHUNK splits per step of a runtime loop;
    no key at all -> 0, -inf."""
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    num_chunks = tl.cdiv(num_splits, CHUNK)
    if INTERPRET:  # the interpreter (numpy >= 2.4) cannot take a tensor as a range() bound
        c = 0
        while c < num_chunks:
            m, den, acc = merge_split_chunk(
                m, den, acc, c, wl_row, wo_row, num_splits, stride_wos, mask_h, mask_d, CHUNK
            )
            c += 1
    else:
        for c in range(0, num_chunks):
            m, den, acc = merge_split_chunk(
                m, den, acc, c, wl_row, wo_row, num_splits, stride_wos, mask_h, mask_d, CHUNK
            )
    safe = tl.where(den > 0, den, 1.0)
    return acc / safe[:, None], tl.where(den > 0, m + tl.log(safe), float("-inf"))


@triton.jit(do_not_specialize=[
    "num_splits", "stride_wot", "stride_woh", "stride_wos", "stride_wlt", "stride_wlh",
    "stride_ot", "stride_oh", "stride_lt", "stride_lh",
])  # fmt: skip
def _split_rows_merge_kernel(
    wo_ptr, wl_ptr, o_ptr, l_ptr, rows_ptr, num_heads, num_splits,
    stride_wot, stride_woh, stride_wos, stride_wlt, stride_wlh,
    stride_ot, stride_oh, stride_lt, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, CHUNK: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    row = tl.load(rows_ptr + tl.program_id(0)).to(tl.int64)
    if row >= 0:  # -1: a padding entry of a CUDA graph's fixed grid
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
        mask_h = heads < num_heads
        mask_d = dims < HEAD_DIM
        wl_row = wl_ptr + row * stride_wlt + heads[None, :] * stride_wlh  # [1, BLOCK_H]
        wo_row = wo_ptr + row * stride_wot + heads[None, :, None] * stride_woh + dims[None, None, :]
        out, lse = merge_row_splits(
            wl_row, wo_row, num_splits, stride_wos, mask_h, mask_d, BLOCK_H, BLOCK_D, CHUNK, INTERPRET
        )
        tl.store(
            o_ptr + row * stride_ot + heads[:, None] * stride_oh + dims[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=mask_h[:, None] & mask_d[None, :],
        )
        tl.store(l_ptr + row * stride_lt + heads * stride_lh, lse, mask=mask_h)


def merge_splits(
    o_ws: torch.Tensor,  # [num_tokens, num_heads, num_splits, head_dim] float32
    l_ws: torch.Tensor,  # [num_tokens, num_heads, num_splits] float32
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    lse: torch.Tensor,  # [num_tokens, num_heads] float32
    merge_rows: torch.Tensor,  # [num_covered_rows] int32; -1 entries are skipped (padding)
    num_splits: int,
    block_h: int = 2,
    chunk: int = 8,
    num_warps: int = 2,
) -> None:
    """The chunk kernels' phase 2: the exact LSE merge of every covered row's splits into
    out / lse, `block_h` heads per program, `chunk` splits per step. Launch only: no host sync.

    The defaults, 2 heads x 8 splits with 2 warps: the best or within 3% of it of nine
    variants tried on an H200 for head dims 64 and 128 (`benchmarks/probes/split_merge_variants.py`),
    over one row's 32 splits after 408K keys, a 2340-token prompt's 2 splits, and both in one
    launch (2026-11-30, session 10 README)."""
    if out.stride(-1) != 1 or o_ws.stride(-1) != 1:
        raise ValueError("the last dim of out and of the workspace must be contiguous")
    num_heads, head_dim = out.shape[1], out.shape[2]
    block_d = max(16, next_power_of_2(head_dim))
    _split_rows_merge_kernel[(merge_rows.shape[0], cdiv(num_heads, block_h))](
        o_ws, l_ws, out, lse, merge_rows, num_heads, num_splits,
        o_ws.stride(0), o_ws.stride(1), o_ws.stride(2), l_ws.stride(0), l_ws.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_H=block_h, CHUNK=chunk,
        INTERPRET=triton.knobs.runtime.interpret, num_warps=num_warps,
    )  # fmt: skip
