"""Fused write of the new K/V rows into the paged KV cache.

Token r of the batch goes to flat slot s = slot_mapping[r] (-1: skipped)::

    k_cache[s // B, s % B, h, :] = key[r, h, :]      (B = block_size, all kv heads h)
    v_cache[s // B, s % B, h, :] = value[r, h, :]    (cast to the cache dtype)

One program per (token, group of BLOCK_H kv heads) writes both K and V; the -1 rows
are masked, so there is no host sync and the launch is graph-capturable. Same result
as `TorchReferenceBackend.write_kv`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mnemosyne.kernels.host_math import cdiv, next_power_of_2


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    mask = (slot >= 0) & (heads[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    safe = tl.maximum(slot, 0)
    page = safe // BLOCK_SIZE
    in_page = safe % BLOCK_SIZE

    k = tl.load(key_ptr + tok * stride_kt + heads[:, None] * stride_kh + offs_d[None, :], mask=mask)
    kc = (
        k_cache_ptr + page * stride_kcb + in_page * stride_kcs + heads[:, None] * stride_kch + offs_d[None, :]
    )
    tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=mask)
    vc = (
        v_cache_ptr + page * stride_vcb + in_page * stride_vcs + heads[:, None] * stride_vch + offs_d[None, :]
    )
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    """Write K and V of token r to flat slot slot_mapping[r] (one kernel, no host sync)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    block_size = k_cache.shape[1]
    if value.shape != key.shape or v_cache.shape != k_cache.shape or k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(
            f"bad shapes: key/value {tuple(key.shape)}, {tuple(value.shape)}, cache {tuple(k_cache.shape)}"
        )
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} does not match {num_tokens} tokens")
    for t in (key, value, k_cache, v_cache):
        if t.stride(-1) != 1:
            raise ValueError("the last dim of key / value / caches must be contiguous")
    if num_tokens == 0:
        return
    block_d = next_power_of_2(head_dim)
    block_h = min(next_power_of_2(num_kv_heads), max(1, 4096 // block_d))
    grid = (num_tokens, cdiv(num_kv_heads, block_h))
    _write_kv_kernel[grid](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip


__all__ = ["write_kv_cache"]
