"""Probe: a Gluon (Triton's explicit-layout dialect) Hopper kernel for the part of a prefill
chunk's attention that dominates long-context mixed steps, the chunk's queries over its
whole prefix, beside the engine's Triton TMA kernel (`kernels/chunk_tma_attention.py`).

Why: at 32-64-token chunks after 128K-512K keys the engine's kernel runs at 350-480
TFLOP/s against cuDNN's 590 on dense prefill; Triton 3.6 does not overlap a tile's softmax
with the next tile's tensor-core work on sm_90, and FA3 gets its speed from that overlap.
Gluon writes it out: async wgmma with explicit waits, TMA loads into a ring of shared-memory
stages signalled by mbarriers. This measures whether that closes the gap before the engine
grows a second kernel.

The problem (one sequence, one chunk): queries q [c, num_heads, head_dim], P prefix keys
in a paged cache, every key visible to every query (the prefix of a chunk: no causal mask,
no window). Per (M tile, KV head, split) program::

    M tile  = 128 rows: tokens x the G query heads of one KV head (row r: token r // G,
              head kv_head * G + r % G), as the engine's kernels pack them
    split   = steps [s0, s1) of BLOCK_N = page keys each (one TMA box per page, located
              through the block table); splits merged exactly by the engine's merge kernel

    variant SERIAL:   per step  wait stage -> S = Q K^T (wgmma) -> softmax -> O += P V (wgmma),
                      each wgmma waited at once (what Triton emits)
    variant PIPELINED (FA3's intra-warpgroup overlap): S(i+1) = Q K(i+1)^T is issued before
                      the softmax of S(i), and O += P(i) V(i) stays in flight through the
                      next step's softmax; two warpgroups (8 warps) split the 128 rows

    stage reuse: a stage is refilled NUM_STAGES - 1 steps after the step that read it, once
    every warp has passed a CTA barrier after that step's last wgmma on it completed

    python -m benchmarks.probes.gluon_chunk_prefix --compile-only        # CPU: PTX, registers
    python -m benchmarks.probes.gluon_chunk_prefix --out OUT.json        # H200: check + time

Timing: CUDA graphs of 20 launches (split phase + merge), median of 5 replays, beside the
floor max(FLOPs / 590 TFLOP/s, K/V bytes / 4.2 TB/s) and the engine's kernel on the same
inputs (which also computes the chunk's own causal part: c more keys, <0.1% at these P).

Measured (H200, benchmarks/results/session18_h200x2_2026-12-01/b-e/): serial and pipelined
no faster than the engine's TMA kernel; the warp-specialized variants (below) 7-22% faster
for 8B heads (32-128-token chunks after 128K-512K keys: 1.13-1.25x the floor against
1.31-1.46x), no faster at head dim 64. `ws_s4` became an opt-in engine kernel, which in the
engine ran slower than the TMA kernel in every cell (benchmarks/results/session19_h200_2026-12-01/:
the TMA baseline here ran 4-7% slower than the engine's backend runs it, and the engine's
version of the design, with the causal mask, windows and a persistent item loop, 12-17%
slower than `ws_s4` at the same split count), so it was taken out again; this probe is the
record of the design.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

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

ATTN_FLOPS = 590e12
COPY_BPS = 4.2e12
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@gluon.jit
def _issue(k_desc, v_desc, k_smem, v_smem, bars, bt_ptr, step, stage, kv_col, pred,
           BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):  # fmt: skip
    """TMA loads of step `step`'s K and V page into `stage`, signalled on its barrier."""
    page = gl.load(bt_ptr + step, mask=pred, other=0)
    row = page * BLOCK_N
    bar = bars.index(stage)
    mbarrier.expect(bar, 2 * BLOCK_N * HEAD_DIM * 2, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [row, kv_col], bar, k_smem.index(stage), pred=pred)
    tma.async_copy_global_to_shared(v_desc, [row, kv_col], bar, v_smem.index(stage), pred=pred)


@gluon.jit
def _prefix_kernel(
    q_ptr, k_desc, v_desc, o_ptr, l_ptr, bt_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_ls,
    num_q_tokens, num_steps, steps_per_split, qk_scale,
    HEAD_DIM: gl.constexpr, G: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr, PIPELINED: gl.constexpr, NUM_WARPS: gl.constexpr,
):  # fmt: skip
    tile = gl.program_id(0)
    kv_head = gl.program_id(1)
    split = gl.program_id(2)
    s0 = split * steps_per_split
    n = gl.minimum(s0 + steps_per_split, num_steps) - s0

    mma_s: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BLOCK_N, 16]
    )
    mma_o: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, mma_s)
    row_o: gl.constexpr = gl.SliceLayout(1, mma_o)
    blk: gl.constexpr = gl.BlockedLayout(
        size_per_thread=[1, 8], threads_per_warp=[32 * 8 // HEAD_DIM, HEAD_DIM // 8],
        warps_per_cta=[NUM_WARPS, 1], order=[1, 0],
    )  # fmt: skip

    # Q tile [BLOCK_M, HEAD_DIM] -> shared memory (the A operand of S = Q K^T)
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, blk))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, blk))
    tok = tile * (BLOCK_M // G) + rows // G
    head = kv_head * G + rows % G
    q_off = tok[:, None] * stride_qt + head[:, None] * stride_qh + cols[None, :]
    q = gl.load(q_ptr + q_off, mask=(tok < num_q_tokens)[:, None], other=0.0)
    q_smem = gl.allocate_shared_memory(
        gl.bfloat16, [BLOCK_M, HEAD_DIM], gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], gl.bfloat16), q
    )

    k_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(bars.index(i), count=1)
    kv_col = kv_head * HEAD_DIM
    bt = bt_ptr + s0
    for i in gl.static_range(NUM_STAGES - 1):
        _issue(k_desc, v_desc, k_smem, v_smem, bars, bt, i, i, kv_col, i < n, BLOCK_N, HEAD_DIM)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=mma_o)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma_s)

    if PIPELINED:
        mbarrier.wait(bars.index(0), 0, pred=n > 0)
        s_cur = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False)
        acc = warpgroup_mma_init(acc)  # carried in flight: an async accumulator on both ends
        for i in range(n):
            st = i % NUM_STAGES
            nx = i + 1
            nst = nx % NUM_STAGES
            has_next = nx < n
            # S(i+1) in flight through the softmax of S(i)
            mbarrier.wait(bars.index(nst), (nx // NUM_STAGES) & 1, pred=has_next)
            s_nxt = warpgroup_mma(q_smem, k_smem.index(nst).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            m_new = gl.maximum(m_i, gl.max(s_cur, axis=1) * qk_scale)
            p = gl.exp2(s_cur * qk_scale - m_new[:, None])
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            p16 = gl.convert_layout(p.to(gl.bfloat16), p_op)
            # O += P(i-1) V(i-1) done (issued before S(i+1)): rescale, then O += P(i) V(i)
            acc = warpgroup_mma_wait(1, deps=[acc])
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            acc = warpgroup_mma(p16, v_smem.index(st), acc, is_async=True)
            s_cur = warpgroup_mma_wait(1, deps=[s_nxt])
            # stage of step i - 1 is free once every warp is past its PV: refill it
            gl.thread_barrier()
            ref = i + NUM_STAGES - 1
            _issue(k_desc, v_desc, k_smem, v_smem, bars, bt, ref, ref % NUM_STAGES, kv_col, ref < n,
                   BLOCK_N, HEAD_DIM)  # fmt: skip
        acc = warpgroup_mma_wait(0, deps=[acc])
    else:
        for i in range(n):
            st = i % NUM_STAGES
            mbarrier.wait(bars.index(st), (i // NUM_STAGES) & 1)
            s = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False)
            m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
            p = gl.exp2(s * qk_scale - m_new[:, None])
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_op), v_smem.index(st), acc)
            gl.thread_barrier()
            ref = i + NUM_STAGES - 1
            _issue(k_desc, v_desc, k_smem, v_smem, bars, bt, ref, ref % NUM_STAGES, kv_col, ref < n,
                   BLOCK_N, HEAD_DIM)  # fmt: skip
    for i in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(bars.index(i))

    # normalised output and natural-log LSE per row (0 and -inf for a row that saw no key)
    seen = l_i > 0.0
    l_safe = gl.where(seen, l_i, 1.0)
    lse = gl.where(seen, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o = acc / gl.convert_layout(l_safe, row_o)[:, None]
    o = gl.convert_layout(o, blk)
    o_off = tok[:, None] * stride_ot + head[:, None] * stride_oh + split * stride_os + cols[None, :]
    gl.store(o_ptr + o_off, o, mask=(tok < num_q_tokens)[:, None])
    lse = gl.convert_layout(lse, gl.SliceLayout(1, blk))
    gl.store(l_ptr + tok * stride_lt + head * stride_lh + split * stride_ls, lse, mask=tok < num_q_tokens)


# ---- the warp-specialized variants: a loader warp and two consumer warpgroups -----------
#
#     loader (1 warp)        per step: wait empty[stage] (both consumers done with it), expect
#                            ready[stage], TMA K and V of the step's PAGES pages
#     consumer h = 0, 1      4 warps each (the default partition is consumer 0), releasing a
#     (4 warps each)         stage (arrive on empty, count 2) once its PV wgmma completed
#       halves  (TWO_TILES=False): rows [64 h, 64 h + 64) of the program's M tile, the
#               PIPELINED loop above (S(i+1) in flight through the softmax of S(i))
#       two tiles (TWO_TILES=True): M tile 2 * program + h, all 128 rows, each step's wgmmas
#               waited at once; K/V are read into shared memory once for both tiles
# The consumers are not lock-stepped: one's softmax runs beside the other's wgmma.


@gluon.jit
def _ws_loader(args, HEAD_DIM: gl.constexpr, G: gl.constexpr, PAGE: gl.constexpr, PAGES: gl.constexpr,
               NUM_STAGES: gl.constexpr, TWO_TILES: gl.constexpr):  # fmt: skip
    (q_ptr, k_desc, v_desc, o_ptr, l_ptr, bt_ptr, q_smem, k_smem, v_smem, ready, empty,
     stride_qt, stride_qh, stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_ls,
     tile, kv_head, split, s0, n, num_q_tokens, qk_scale) = args  # fmt: skip
    kv_col = kv_head * HEAD_DIM
    for i in range(n):
        st = i % NUM_STAGES
        mbarrier.wait(empty.index(st), ((i // NUM_STAGES) & 1) ^ 1)
        bar = ready.index(st)
        mbarrier.expect(bar, 2 * PAGES * PAGE * HEAD_DIM * 2)
        for j in gl.static_range(PAGES):
            row = gl.load(bt_ptr + (s0 + i) * PAGES + j) * PAGE
            tma.async_copy_global_to_shared(k_desc, [row, kv_col], bar, k_smem.index(st).slice(j * PAGE, PAGE))
            tma.async_copy_global_to_shared(v_desc, [row, kv_col], bar, v_smem.index(st).slice(j * PAGE, PAGE))


@gluon.jit
def _ws_consume(args, H: gl.constexpr, HEAD_DIM: gl.constexpr, G: gl.constexpr, PAGE: gl.constexpr,
                PAGES: gl.constexpr, NUM_STAGES: gl.constexpr, TWO_TILES: gl.constexpr):  # fmt: skip
    (q_ptr, k_desc, v_desc, o_ptr, l_ptr, bt_ptr, q_smem, k_smem, v_smem, ready, empty,
     stride_qt, stride_qh, stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_ls,
     tile, kv_head, split, s0, n, num_q_tokens, qk_scale) = args  # fmt: skip
    BLOCK_N: gl.constexpr = PAGE * PAGES
    ROWS: gl.constexpr = 128 if TWO_TILES else 64
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, mma_s)
    row_o: gl.constexpr = gl.SliceLayout(1, mma_o)
    blk: gl.constexpr = gl.BlockedLayout(
        size_per_thread=[1, 8], threads_per_warp=[32 * 8 // HEAD_DIM, HEAD_DIM // 8],
        warps_per_cta=[4, 1], order=[1, 0],
    )  # fmt: skip
    r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, blk))
    if TWO_TILES:  # M tile 2 * tile + H
        tok = (2 * tile + H) * (128 // G) + r // G
        head = kv_head * G + r % G
    else:  # rows [64 H, 64 H + 64) of M tile `tile`
        tok = tile * (128 // G) + (H * 64 + r) // G
        head = kv_head * G + (H * 64 + r) % G
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, blk))
    q = gl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + cols[None, :],
                mask=(tok < num_q_tokens)[:, None], other=0.0)  # fmt: skip
    q_own = q_smem.index(H)
    q_own.store(q)
    fence_async_shared()

    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.full([ROWS], 0.0, gl.float32, layout=row_s)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=mma_s)
    if TWO_TILES:
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=mma_o)
        for i in range(n):
            st = i % NUM_STAGES
            mbarrier.wait(ready.index(st), (i // NUM_STAGES) & 1)
            s = warpgroup_mma(q_own, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False)
            m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
            p = gl.exp2(s * qk_scale - m_new[:, None])
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_op), v_smem.index(st), acc)
            mbarrier.arrive(empty.index(st))
    else:
        acc = warpgroup_mma_init(gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=mma_o))
        mbarrier.wait(ready.index(0), 0, pred=n > 0)
        s_cur = warpgroup_mma(q_own, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False)
        for i in range(n):
            st = i % NUM_STAGES
            nx = i + 1
            nst = nx % NUM_STAGES
            mbarrier.wait(ready.index(nst), (nx // NUM_STAGES) & 1, pred=nx < n)
            s_nxt = warpgroup_mma(q_own, k_smem.index(nst).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            m_new = gl.maximum(m_i, gl.max(s_cur, axis=1) * qk_scale)
            p = gl.exp2(s_cur * qk_scale - m_new[:, None])
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            p16 = gl.convert_layout(p.to(gl.bfloat16), p_op)
            acc = warpgroup_mma_wait(1, deps=[acc])  # PV(i - 1) done: its stage is free here
            mbarrier.arrive(empty.index((i + NUM_STAGES - 1) % NUM_STAGES), pred=i > 0)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            acc = warpgroup_mma(p16, v_smem.index(st), acc, is_async=True)
            s_cur = warpgroup_mma_wait(1, deps=[s_nxt])
        acc = warpgroup_mma_wait(0, deps=[acc])

    seen = l_i > 0.0
    l_safe = gl.where(seen, l_i, 1.0)
    lse = gl.where(seen, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o = gl.convert_layout(acc / gl.convert_layout(l_safe, row_o)[:, None], blk)
    o_off = tok[:, None] * stride_ot + head[:, None] * stride_oh + split * stride_os + cols[None, :]
    gl.store(o_ptr + o_off, o, mask=(tok < num_q_tokens)[:, None])
    lse = gl.convert_layout(lse, gl.SliceLayout(1, blk))
    gl.store(l_ptr + tok * stride_lt + head * stride_lh + split * stride_ls, lse, mask=tok < num_q_tokens)


@gluon.jit
def _ws_consumer0(args, HEAD_DIM: gl.constexpr, G: gl.constexpr, PAGE: gl.constexpr, PAGES: gl.constexpr,
                  NUM_STAGES: gl.constexpr, TWO_TILES: gl.constexpr):  # fmt: skip
    _ws_consume(args, 0, HEAD_DIM, G, PAGE, PAGES, NUM_STAGES, TWO_TILES)


@gluon.jit
def _ws_consumer1(args, HEAD_DIM: gl.constexpr, G: gl.constexpr, PAGE: gl.constexpr, PAGES: gl.constexpr,
                  NUM_STAGES: gl.constexpr, TWO_TILES: gl.constexpr):  # fmt: skip
    _ws_consume(args, 1, HEAD_DIM, G, PAGE, PAGES, NUM_STAGES, TWO_TILES)


@gluon.jit
def _ws_prefix_kernel(
    q_ptr, k_desc, v_desc, o_ptr, l_ptr, bt_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_ls,
    num_q_tokens, num_steps, steps_per_split, qk_scale,
    HEAD_DIM: gl.constexpr, G: gl.constexpr, PAGE: gl.constexpr, PAGES: gl.constexpr,
    NUM_STAGES: gl.constexpr, TWO_TILES: gl.constexpr,
):  # fmt: skip
    tile = gl.program_id(0)
    kv_head = gl.program_id(1)
    split = gl.program_id(2)
    s0 = split * steps_per_split
    n = gl.minimum(s0 + steps_per_split, num_steps) - s0
    ROWS: gl.constexpr = 128 if TWO_TILES else 64
    BLOCK_N: gl.constexpr = PAGE * PAGES
    q_smem = gl.allocate_shared_memory(
        gl.bfloat16, [2, ROWS, HEAD_DIM], gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], gl.bfloat16)
    )
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], gl.bfloat16)
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    args = (q_ptr, k_desc, v_desc, o_ptr, l_ptr, bt_ptr, q_smem, k_smem, v_smem, ready, empty,
            stride_qt, stride_qh, stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_ls,
            tile, kv_head, split, s0, n, num_q_tokens, qk_scale)  # fmt: skip
    gl.warp_specialize([
        (_ws_consumer0, (args, HEAD_DIM, G, PAGE, PAGES, NUM_STAGES, TWO_TILES)),
        (_ws_consumer1, (args, HEAD_DIM, G, PAGE, PAGES, NUM_STAGES, TWO_TILES)),
        (_ws_loader, (args, HEAD_DIM, G, PAGE, PAGES, NUM_STAGES, TWO_TILES)),
    ], [4, 1], [232, 24])  # fmt: skip

VARIANTS: dict[str, dict] = {  # name -> kernel and its options
    "serial_w8_s3": {"ws": False, "pipelined": False, "num_warps": 8, "stages": 3},
    "pipelined_w8_s4": {"ws": False, "pipelined": True, "num_warps": 8, "stages": 4},
    "ws_s4": {"ws": True, "pages": 1, "stages": 4, "two_tiles": False},
    "ws_p2_s2": {"ws": True, "pages": 2, "stages": 2, "two_tiles": False},  # hung on an H200 (d/)
    "ws2t_s4": {"ws": True, "pages": 1, "stages": 4, "two_tiles": True},
    "ws2t_s3": {"ws": True, "pages": 1, "stages": 3, "two_tiles": True},
}
BLOCK_M = 128
MAXNREG_WS = 168  # 12 warps (4 + 4 + 1, rounded up to warpgroups) x 32 x 168 <= 65536


def kv_layout(block_n: int, head_dim: int) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for([block_n, head_dim], gl.bfloat16)


def constexprs(head_dim: int, g: int, page: int, variant: str) -> dict:
    v = VARIANTS[variant]
    if v["ws"]:
        return {"HEAD_DIM": head_dim, "G": g, "PAGE": page, "PAGES": v["pages"], "NUM_STAGES": v["stages"],
                "TWO_TILES": v["two_tiles"]}  # fmt: skip
    return {
        "HEAD_DIM": head_dim, "G": g, "BLOCK_M": BLOCK_M, "BLOCK_N": page,
        "NUM_STAGES": v["stages"], "PIPELINED": v["pipelined"], "NUM_WARPS": v["num_warps"],
    }  # fmt: skip


def kernel_of(variant: str):  # -> the gluon JIT function
    return _ws_prefix_kernel if VARIANTS[variant]["ws"] else _prefix_kernel


def launch_options(variant: str) -> dict:
    v = VARIANTS[variant]
    return {"num_warps": 4, "maxnreg": MAXNREG_WS} if v["ws"] else {"num_warps": v["num_warps"]}


def keys_per_step(page: int, variant: str) -> int:
    return page * VARIANTS[variant].get("pages", 1)


def tiles_per_program(variant: str) -> int:
    return 2 if VARIANTS[variant].get("two_tiles") else 1


def compile_only(head_dim: int, g: int, block_n: int, variant: str) -> dict:
    """Compile for sm_90 without a GPU (ptxas ships with Triton): registers, spills, shared."""
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    desc = f"tensordesc<bf16[{block_n}, {head_dim}],{kv_layout(block_n, head_dim)!r}>"
    ints = ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_os", "stride_lt", "stride_lh",
            "stride_ls", "num_q_tokens", "num_steps", "steps_per_split")  # fmt: skip
    sig = {"q_ptr": "*bf16", "k_desc": desc, "v_desc": desc, "o_ptr": "*fp32", "l_ptr": "*fp32", "bt_ptr": "*i32"}
    sig |= {name: "i32" for name in ints} | {"qk_scale": "fp32"}
    consts = constexprs(head_dim, g, block_n, variant)
    sig |= {name: "constexpr" for name in consts}
    k = triton.compile(
        GluonASTSource(kernel_of(variant), sig, consts), target=GPUTarget("cuda", 90, 32),
        options=launch_options(variant),
    )  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
        res = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    ptx = k.asm["ptx"]
    return {
        "variant": variant, "head_dim": head_dim, "G": g, "block_n": block_n, "shared": k.metadata.shared,
        "resource_usage": " ".join(res.split()[-12:]), "wgmma": ptx.count("wgmma.mma_async"),
        "tma": ptx.count("cp.async.bulk.tensor"),
    }  # fmt: skip


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [c, H, D], k / v [P, KVH, D] (logical order): every key visible; fp32 out and LSE."""
    g = q.shape[1] // k.shape[1]
    kk = k.float().repeat_interleave(g, dim=1)  # [P, H, D]
    vv = v.float().repeat_interleave(g, dim=1)
    s = torch.einsum("chd,phd->hcp", q.float(), kk) * scale
    lse = torch.logsumexp(s, dim=-1)  # [H, c]
    o = torch.einsum("hcp,phd->chd", torch.softmax(s, dim=-1), vv)
    return o, lse.transpose(0, 1)


class Case:
    """One chunk of c queries after P keys in a paged cache whose pages are shuffled."""

    def __init__(self, c: int, prefix: int, num_heads: int, num_kv_heads: int, head_dim: int, page: int,
                 seed: int = 0) -> None:  # fmt: skip
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.c, self.prefix, self.page = c, prefix, page
        num_pages = -(-(prefix + c) // page)
        self.k_cache = torch.randn(num_pages + 1, page, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)  # fmt: skip
        self.v_cache = torch.randn_like(self.k_cache)
        self.q = torch.randn(c, num_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        perm = torch.randperm(num_pages + 1, device="cuda", generator=gen)
        self.block_table = perm[:num_pages].to(torch.int32)  # logical page -> cache page
        self.scale = head_dim**-0.5

    def logical_kv(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pages = self.block_table.long()
        k = self.k_cache[pages].flatten(0, 1)[:n]
        v = self.v_cache[pages].flatten(0, 1)[:n]
        return k, v


def gluon_launcher(case: Case, variant: str, num_splits: int):
    """A closure that runs the split phase and the engine's merge into (out, lse)."""
    from mnemosyne.kernels.merge_attn import merge_splits

    c, (num_kv_heads, head_dim) = case.c, case.k_cache.shape[2:]
    num_heads = case.q.shape[1]
    g = num_heads // num_kv_heads
    page = case.page
    num_steps = case.prefix // keys_per_step(page, variant)
    steps_per_split = -(-num_steps // num_splits)
    layout = kv_layout(page, head_dim)
    k_desc = TensorDescriptor.from_tensor(case.k_cache.view(-1, num_kv_heads * head_dim), [page, head_dim], layout)
    v_desc = TensorDescriptor.from_tensor(case.v_cache.view(-1, num_kv_heads * head_dim), [page, head_dim], layout)
    o_ws = torch.empty(c, num_heads, num_splits, head_dim, device="cuda", dtype=torch.float32)
    l_ws = torch.empty(c, num_heads, num_splits, device="cuda", dtype=torch.float32)
    out = torch.empty(c, num_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(c, num_heads, device="cuda", dtype=torch.float32)
    rows = torch.arange(c, device="cuda", dtype=torch.int32)
    m_tiles = -(-c * g // BLOCK_M)
    num_tiles = -(-m_tiles // tiles_per_program(variant))  # programs along the M tiles
    consts = constexprs(head_dim, g, page, variant)

    def run() -> None:
        kernel_of(variant)[(num_tiles, num_kv_heads, num_splits)](
            case.q, k_desc, v_desc, o_ws, l_ws, case.block_table,
            *case.q.stride()[:2], *o_ws.stride()[:3], *l_ws.stride(),
            c, num_steps, steps_per_split, case.scale * _LOG2E,
            **consts, **launch_options(variant),
        )  # fmt: skip
        merge_splits(o_ws, l_ws, out, lse, rows, num_splits)

    return run, out, lse


def engine_launcher(case: Case, num_splits: int):
    """The engine's TMA chunk kernel on the same chunk (its causal part included)."""
    from mnemosyne.kernels.chunk_tma_attention import chunk_tma_attention
    from mnemosyne.kernels.paged_prefill import default_block_q, plan_query_tiles

    c, num_heads, head_dim = case.q.shape
    g = num_heads // case.k_cache.shape[2]
    dev = "cuda"
    qsl = torch.tensor([0, c], device=dev, dtype=torch.int32)
    q_pos = torch.tensor([case.prefix], device=dev, dtype=torch.int64)
    kv_start = torch.zeros(1, device=dev, dtype=torch.int64)
    kv_lens = torch.tensor([case.prefix + c], device=dev, dtype=torch.int32)
    bt = case.block_table[None, :]
    block_q = default_block_q(g, case.q.dtype)
    tile_seq, tile_off = (torch.tensor(x, dtype=torch.int32, device=dev) for x in plan_query_tiles([c], [0], block_q))
    merge_rows = torch.arange(c, dtype=torch.int32, device=dev)
    ws = (torch.empty(c, num_heads, num_splits, head_dim, device=dev), torch.empty(c, num_heads, num_splits, device=dev))
    out = torch.empty_like(case.q)
    lse = torch.empty(c, num_heads, device=dev, dtype=torch.float32)

    def run() -> None:
        chunk_tma_attention(
            case.q, case.k_cache, case.v_cache, qsl, q_pos, kv_start, kv_lens, bt, tile_seq, tile_off,
            out, lse, case.scale, None, num_splits=num_splits, merge_rows=merge_rows, block_q=block_q,
            workspace=ws,
        )  # fmt: skip

    return run, out, lse


def graph_time_s(run, reps: int = 20, trials: int = 5) -> float:
    """Median over `trials` replays of a CUDA graph of `reps` launches, per launch."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            run()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times)


SHAPES = {"8b": (32, 8, 128), "1b": (32, 8, 64)}  # query heads, KV heads, head dim


def floor_s(c: int, prefix: int, num_heads: int, num_kv_heads: int, head_dim: int) -> float:
    flops = 4 * num_heads * head_dim * c * prefix
    kv_bytes = 2 * prefix * num_kv_heads * head_dim * 2
    return max(flops / ATTN_FLOPS, kv_bytes / COPY_BPS)


def check(variants: list[str]) -> list[dict]:
    """Every variant against the fp32 reference: odd chunk sizes, shuffled pages, 1-5 splits."""
    rows = []
    for shape, (h, hkv, d) in SHAPES.items():
        for c, prefix, splits in [(17, 4096, 1), (32, 8192, 3), (64, 8192, 5), (33, 12288, 2), (128, 4096, 4)]:
            case = Case(c, prefix, h, hkv, d, 64, seed=c + prefix)
            k, v = case.logical_kv(prefix)
            ref_o, ref_l = reference(case.q, k, v, case.scale)
            for variant in variants:
                run, out, lse = gluon_launcher(case, variant, splits)
                run()
                torch.cuda.synchronize()
                err_o = (out.float() - ref_o).abs().max().item()
                err_l = (lse - ref_l).abs().max().item()
                ok = err_o < 2e-2 and err_l < 1e-3
                rows.append({"shape": shape, "c": c, "prefix": prefix, "splits": splits, "variant": variant,
                             "max_abs_err_out": err_o, "max_abs_err_lse": err_l, "ok": ok})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


def sweep(variants: list[str], chunks: list[int], prefixes: list[int], shapes: list[str]) -> list[dict]:
    from mnemosyne.kernels.chunk_splitkv_attention import choose_chunk_splits
    from mnemosyne.kernels.chunk_tma_attention import PAGE_TILES_MAX_SPLITS, PAGE_TILES_WAVES

    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for shape in shapes:
        h, hkv, d = SHAPES[shape]
        g = h // hkv
        for prefix in prefixes:
            for c in chunks:
                case = Case(c, prefix, h, hkv, d, 64)
                fl = floor_s(c, prefix, h, hkv, d)
                tiles = -(-c * g // BLOCK_M)
                eng_splits = choose_chunk_splits(tiles, hkv, prefix + c, num_sms, PAGE_TILES_WAVES,
                                                 max_splits=PAGE_TILES_MAX_SPLITS)  # fmt: skip
                run, out_e, lse_e = engine_launcher(case, eng_splits)
                t = graph_time_s(run)
                base = {"shape": shape, "c": c, "prefix": prefix, "floor_ms": fl * 1e3}
                rows.append({**base, "kernel": "engine_tma", "splits": eng_splits, "ms": t * 1e3, "ratio": t / fl})
                print(json.dumps(rows[-1]), flush=True)
                for variant in variants:
                    per = tiles_per_program(variant)
                    if tiles % per:
                        continue  # a two-tile program needs an even tile count here
                    one_wave = max(1, num_sms // (tiles // per * hkv))
                    for splits in sorted({eng_splits, one_wave, 2 * one_wave + 1}):
                        run, out, lse = gluon_launcher(case, variant, splits)
                        t = graph_time_s(run)
                        diff = (out.float() - out_e.float()).abs().max().item()
                        rows.append({**base, "kernel": "gluon", "variant": variant, "splits": splits,
                                     "ms": t * 1e3, "ratio": t / fl, "max_abs_diff_vs_engine": diff})  # fmt: skip
                        print(json.dumps(rows[-1]), flush=True)
                del case
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile-only", action="store_true", help="CPU: compile every variant for sm_90")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--chunks", default="32,64,128")
    p.add_argument("--prefixes", default="131072,524288")
    p.add_argument("--shapes", default="8b,1b")
    p.add_argument("--check-only", action="store_true", help="GPU: only the check against the reference")
    p.add_argument("--out", default=None)
    ns = p.parse_args(argv)
    variants = ns.variants.split(",")
    if ns.compile_only:
        for d in (128, 64):
            for variant in variants:
                print(json.dumps(compile_only(d, 4, 64, variant)), flush=True)
        return
    started = time.time()
    result = {
        "command": "python -m benchmarks.probes.gluon_chunk_prefix " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__, "triton": triton.__version__,
        "compiled": [compile_only(SHAPES[s][2], 4, 64, v) for s in ns.shapes.split(",") for v in variants],
        "check": check(variants),
    }  # fmt: skip
    if ns.check_only:
        return
    result["sweep"] = sweep(variants, [int(x) for x in ns.chunks.split(",")],
                            [int(x) for x in ns.prefixes.split(",")], ns.shapes.split(","))  # fmt: skip
    result["seconds"] = time.time() - started
    if ns.out:
        Path(ns.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
