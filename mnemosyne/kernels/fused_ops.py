"""Fused elementwise kernels of a decoder layer: RMSNorm (+ residual add), RoPE, SiLU * mul.

Each op is one Triton launch in place of torch's chain of tiny kernels, with the same
roundings as the torch code in `mnemosyne/layers` (which stays the CPU path)::

    rms_norm(x, w, eps)              h = fp32(x); y = dtype(h * rsqrt(mean(h^2) + eps)) * w
    add_rms_norm(x, r, w, eps)       r' = x + r (rounded to dtype); (rms_norm(r'), r')
    apply_rotary(q, k, pos, inv_f)   rotate-half RoPE of q and k, in place
    silu_and_mul(x)                  dtype(silu(gate)) * up, [gate | up] = x's last dim

Products and sums of two dtype values are taken in fp32 and rounded once, as torch does.
Differences from torch: the fp32 sum of squares is reduced in another order (last-bit
differences of the rsqrt), and RoPE's `q * cos + rotate_half(q) * sin` is computed in
fp32 from the dtype-rounded cos/sin and rounded once (torch rounds each product). On CUDA
cos/sin/exp are libdevice's `__nv_cosf`/`__nv_sinf`/`__nv_expf` (what torch's CUDA ops call;
Triton lowers tl.cos/tl.sin to them, tl.exp to a bare ex2.approx, so exp is called explicitly).

No host syncs (the launches are CUDA-graph capturable); num_tokens == 0 launches nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from mnemosyne.kernels.host_math import cdiv, next_power_of_2

_MAX_NORM_BLOCK = 16384  # hidden sizes up to this are normed in one pass from registers


def _precise(t: torch.Tensor) -> bool:
    """libdevice math on a GPU; the interpreter has only numpy's (already accurate)."""
    return t.is_cuda and not triton.knobs.runtime.interpret


@triton.jit
def _norm_input(x_row, r_row, res_out_row, offs, mask, HAS_RESIDUAL: tl.constexpr, STORE: tl.constexpr):
    """fp32 values at offs of the norm input: x, or x + residual rounded to the residual
    stream's dtype (written to res_out_row when STORE)."""
    x = tl.load(x_row + offs, mask=mask, other=0.0)
    h = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_row + offs, mask=mask, other=0.0)
        s = (h + r.to(tl.float32)).to(res_out_row.dtype.element_ty)
        if STORE:
            tl.store(res_out_row + offs, s, mask=mask)
        h = s.to(tl.float32)
    return h


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    n_inner, stride_x0, stride_x1, stride_r0, stride_r1, eps,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    # One program per row; rows are (i0, i1) of a [n0, n_inner, HIDDEN] strided view.
    row = tl.program_id(0).to(tl.int64)
    i0 = row // n_inner
    i1 = row % n_inner
    x_row = x_ptr + i0 * stride_x0 + i1 * stride_x1
    r_row = res_ptr + i0 * stride_r0 + i1 * stride_r1
    out_row = out_ptr + row * HIDDEN  # out and res_out are contiguous
    res_out_row = res_out_ptr + row * HIDDEN  # without residual: x, never written
    norm_ty = res_out_ptr.dtype.element_ty  # dtype of the normed input
    if BLOCK >= HIDDEN:  # one pass, the row stays in registers
        offs = tl.arange(0, BLOCK)
        mask = offs < HIDDEN
        h = _norm_input(x_row, r_row, res_out_row, offs, mask, HAS_RESIDUAL, True)  # [BLOCK] fp32
        inv = tl.rsqrt(tl.sum(h * h, axis=0) / HIDDEN + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = (h * inv).to(norm_ty).to(tl.float32) * w
        tl.store(out_row + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # two passes over BLOCK-wide chunks; the second recomputes x + residual
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, HIDDEN, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < HIDDEN
            h = _norm_input(x_row, r_row, res_out_row, offs, mask, HAS_RESIDUAL, True)
            acc += h * h
        inv = tl.rsqrt(tl.sum(acc, axis=0) / HIDDEN + eps)
        for start in range(0, HIDDEN, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < HIDDEN
            h = _norm_input(x_row, r_row, res_out_row, offs, mask, HAS_RESIDUAL, False)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = (h * inv).to(norm_ty).to(tl.float32) * w
            tl.store(out_row + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _row_views(*ts: torch.Tensor) -> list[torch.Tensor]:
    """[n0, n1, hidden] views (last dim contiguous) of same-shaped [..., hidden] tensors;
    copies only past 3 dims or with a strided last dim."""
    if ts[0].dim() <= 3 and all(t.stride(-1) == 1 for t in ts):
        return [t.reshape((1,) * (3 - t.dim()) + tuple(t.shape)) for t in ts]
    return [t.reshape(-1, t.shape[-1]).contiguous().view(1, -1, t.shape[-1]) for t in ts]


def _rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} != x {tuple(x.shape)}")
    norm_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(norm_dtype, weight.dtype), device=x.device)
    res_out = None if residual is None else torch.empty(x.shape, dtype=norm_dtype, device=x.device)
    if x.numel() == 0:
        return out, res_out
    if residual is None:
        (xv,) = _row_views(x)
        rv = xv
    else:
        xv, rv = _row_views(x, residual)
    n0, n1 = xv.shape[0], xv.shape[1]
    block = min(next_power_of_2(hidden), _MAX_NORM_BLOCK)
    if block < hidden:
        block = 4096
    _rms_norm_kernel[(n0 * n1,)](
        xv, rv, weight.contiguous(), out, xv if res_out is None else res_out,
        n1, xv.stride(0), xv.stride(1), rv.stride(0), rv.stride(1), eps,
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
        num_warps=min(max(block // 512, 1), 16),
    )  # fmt: skip
    return out, res_out


def rms_norm(
    x: torch.Tensor,  # [..., hidden], usually [num_tokens, hidden]; leading dims may be strided
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:  # [..., hidden], contiguous, dtype promote(x, weight)
    """`RMSNorm.forward(x)` in one kernel."""
    return _rms_norm(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed, new residual), both [num_tokens, hidden]
    """new_residual = x + residual (torch's rounding); (rms_norm(new_residual), new_residual)."""
    out, res_out = _rms_norm(x, residual, weight, eps)
    assert res_out is not None
    return out, res_out


@triton.jit
def _rotate_heads(row_ptr, stride_h, head0, num_heads, cos, sin, offs_d, d_mask,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    """In place: [x1 | x2] <- [x1 * cos - x2 * sin | x2 * cos + x1 * sin] for BLOCK_H heads."""
    heads = head0 + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    mask = (heads[:, None] < num_heads) & d_mask[None, :]  # [BLOCK_H, BLOCK_HALF]
    p1 = row_ptr + heads[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(p1.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(p1.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, inv_freq_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    # Program (token, head block): head blocks of q first, then those of k.
    tok = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    inv_freq = tl.load(inv_freq_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    freqs = tl.load(pos_ptr + tok).to(tl.float32) * inv_freq  # [BLOCK_HALF] fp32
    dtype = q_ptr.dtype.element_ty
    cos = tl.cos(freqs).to(dtype).to(tl.float32)[None, :]  # [1, BLOCK_HALF], rounded like torch's table
    sin = tl.sin(freqs).to(dtype).to(tl.float32)[None, :]
    q_blocks = tl.cdiv(NUM_Q_HEADS, BLOCK_H)
    if hb < q_blocks:
        _rotate_heads(q_ptr + tok * stride_qt, stride_qh, hb * BLOCK_H, NUM_Q_HEADS,
                      cos, sin, offs_d, d_mask, HALF, BLOCK_H)  # fmt: skip
    else:
        _rotate_heads(k_ptr + tok * stride_kt, stride_kh, (hb - q_blocks) * BLOCK_H, NUM_K_HEADS,
                      cos, sin, offs_d, d_mask, HALF, BLOCK_H)  # fmt: skip


def apply_rotary(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], any row/head strides, last dim contiguous
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], same
    positions: torch.Tensor,  # [num_tokens] int
    inv_freq: torch.Tensor,  # [head_dim // 2] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """`RotaryEmbedding.forward` ("rotate half" RoPE), written in place into q and k; returns them."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    half = head_dim // 2
    if head_dim % 2 or k.shape != (num_tokens, num_kv_heads, head_dim) or inv_freq.shape != (half,):
        raise ValueError(
            f"bad shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, inv_freq {tuple(inv_freq.shape)}"
        )
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions {tuple(positions.shape)} do not match {num_tokens} tokens")
    if q.dtype != k.dtype or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need one dtype and a contiguous last dim")
    if num_tokens == 0:
        return q, k
    block_half = next_power_of_2(half)
    block_h = min(next_power_of_2(max(num_heads, num_kv_heads)), max(1, 1024 // block_half))
    grid = (num_tokens, cdiv(num_heads, block_h) + cdiv(num_kv_heads, block_h))
    _rotary_kernel[grid](
        q, k, positions, inv_freq.contiguous(),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        NUM_Q_HEADS=num_heads, NUM_K_HEADS=num_kv_heads, HALF=half,
        BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4,
    )  # fmt: skip
    return q, k


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_xt, INTER: tl.constexpr, BLOCK: tl.constexpr,
                         PRECISE: tl.constexpr):  # fmt: skip
    tok = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < INTER
    x_row = x_ptr + tok * stride_xt
    gate = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    if PRECISE:
        e = libdevice.exp(-gate)
    else:
        e = tl.exp(-gate)
    dtype = out_ptr.dtype.element_ty
    silu = tl.math.div_rn(gate, 1.0 + e).to(dtype).to(tl.float32)  # torch: x / (1 + exp(-x))
    tl.store(out_ptr + tok * INTER + offs, (silu * up).to(dtype), mask=mask)


def silu_and_mul(
    x: torch.Tensor,  # [num_tokens, 2 * inter]: [gate | up]; any row stride
) -> torch.Tensor:  # [num_tokens, inter], contiguous
    """`F.silu(gate) * up` for `gate, up = x.chunk(2, dim=-1)` in one kernel."""
    num_tokens, width = x.shape
    if width % 2:
        raise ValueError(f"last dim {width} is not [gate | up]")
    inter = width // 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(num_tokens, inter, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block = min(1024, next_power_of_2(inter))
    grid = (num_tokens, cdiv(inter, block))
    _silu_and_mul_kernel[grid](
        x, out, x.stride(0), INTER=inter, BLOCK=block, PRECISE=_precise(x), num_warps=4
    )  # fmt: skip
    return out
