"""Which cuDNN graphs the chunk path can ask for, and building them all before serving.

PyTorch builds one cuDNN graph per call shape on its first call and caches it (per thread,
unbounded; `aten/src/ATen/native/cudnn/MHA.cpp`). With `TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1`
(set by `cudnn_prefill`) the key of a ragged call (q, k, v in BSHD memory) rounds the query
and key lengths up to powers of two and keeps the batch, the heads, the head dim, the dtype
and the causal flag; an exact call's (q in BHSD memory) keeps the lengths. A build
while serving stalls the step: 1.2 s for the process's first call, tens of ms for each new
shape (benchmarks/results/probes/cudnn_plan_builds_*). `dense_chunk_attention` issues
these kinds of call (see its module docstring)::

    folded prefix, one segment   batch 1, Hkv heads, G*c queries, n <= segment_tokens keys
    folded prefix, split         batch S (2, 4, ...), Hkv heads, G*c queries, per >= 4096 keys
    own keys                     batch 1, H heads, c queries x c keys, causal
    exact (chunks of c in `exact_query_lens` only): the folded prefix's segments of k g keys,
    g = `exact_keys`, k g <= segment_tokens, and the own keys, at their exact lengths

so every shape a chunk of c queries can meet is known from c's range, the longest prefix
and the split rule: `reachable_shapes` lists them, `warm_up_cudnn` runs each once at
start-up, and the kernel backend sends a chunk to cuDNN only if every shape of its calls
(`chunk_call_shapes`) was built; anything else takes the Triton kernel, always compiled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from mnemosyne.kernels.cudnn_prefill import (
    MIN_DENSE_SPLIT_KEYS,
    DenseChunk,
    _bshd,
    _cudnn,
    choose_prefix_splits,
    prefix_parts,
    split_prefix_is_batched,
)


def pow2_bucket(n: int) -> int:
    """n rounded up to a power of two (the plan-cache key's rounding of a length)."""
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True, order=True)
class CudnnShape:
    """One cached cuDNN graph of `_cudnn` for a fixed head dim and dtype."""

    batch: int
    heads: int
    q_len: int  # queries, as the plan-cache key holds them: rounded up to a power of two if ragged
    kv_len: int  # keys per batch entry, the same
    causal: bool
    exact: bool = False  # an exact graph (q in BHSD memory, lengths exact); else ragged


def chunk_call_shapes(
    chunk: DenseChunk, num_heads_per_kv: int, num_kv_heads: int, block_size: int, segment_tokens: int
) -> list[CudnnShape]:
    """The shapes of the cuDNN calls `dense_chunk_attention` makes for `chunk`."""
    c = chunk.num_queries
    folded = pow2_bucket(num_heads_per_kv * c)
    shapes = []
    for k0, k1, causal, exact in prefix_parts(chunk, block_size, segment_tokens):
        if exact:
            heads, rows = (num_kv_heads * num_heads_per_kv, c) if causal else (num_kv_heads, num_heads_per_kv * c)
            shapes.append(CudnnShape(1, heads, rows, k1 - k0, causal, True))
        elif causal:
            shapes.append(CudnnShape(1, num_kv_heads * num_heads_per_kv, pow2_bucket(c), pow2_bucket(c), True))
        else:
            shapes.append(CudnnShape(1, num_kv_heads, folded, pow2_bucket(k1 - k0), False))
    if split_prefix_is_batched(chunk, block_size):
        per = chunk.num_prefix // chunk.prefix_splits
        shapes.append(CudnnShape(chunk.prefix_splits, num_kv_heads, folded, pow2_bucket(per), False))
    return shapes


def cudnn_chunk_lens(
    dense_is_cheaper: Callable[[int, int, bool], bool],  # (queries, keys, page tiles) -> cuDNN cheaper
    max_num_batched_tokens: int,
    max_prefix_tokens: int,
) -> list[int]:
    """The chunk lengths the cost model may send to cuDNN: cheaper than either Triton
    kernel at some key count (prefixes 0, 1, 2, 4, ... and max_prefix_tokens)."""
    prefixes = [0, max_prefix_tokens] + [1 << k for k in range(max(1, max_prefix_tokens).bit_length())]
    return [
        c
        for c in range(2, max_num_batched_tokens + 1)
        if any(dense_is_cheaper(c, c + p, tiles) for p in prefixes for tiles in (False, True))
    ]


def reachable_shapes(
    chunk_lens: list[int],  # every chunk length the backend may send to cuDNN
    num_heads_per_kv: int,
    num_kv_heads: int,
    max_prefix_tokens: int,
    segment_tokens: int,
    num_sms: int,
    exact_query_lens: Iterable[int] = (),
    exact_keys: int = 0,
) -> set[CudnnShape]:
    """Every shape `chunk_call_shapes` can return for these chunk lengths and prefixes of
    0 .. max_prefix_tokens keys (a superset: not every pair of buckets meets in one chunk),
    and for the chunks of `exact_query_lens` (each also in `chunk_lens`) their exact calls::

        own keys:  (1, H, B(c), B(c), causal)
        segments:  (1, Hkv, B(G*c), 2^k, -)   2^k <= B(min(segment_tokens, max_prefix))
        split:     (S, Hkv, B(G*c), 2^k, -)   S = 2 .. splits at max_prefix, 4096 <= 2^k <= B(max_prefix // S)
        exact:     (1, H, c, c, causal, exact), (1, Hkv, G*c, k g, -, exact)   k g <= min(segment_tokens, max_prefix)
    """
    heads = num_kv_heads * num_heads_per_kv
    longest_segment = pow2_bucket(max(1, min(segment_tokens, max_prefix_tokens)))
    shapes = set()
    for c in chunk_lens:
        folded = pow2_bucket(num_heads_per_kv * c)
        shapes.add(CudnnShape(1, heads, pow2_bucket(c), pow2_bucket(c), True))
        kv = 1
        while kv <= longest_segment:
            shapes.add(CudnnShape(1, num_kv_heads, folded, kv, False))
            kv *= 2
        max_splits = choose_prefix_splits(c, num_heads_per_kv, num_kv_heads, max_prefix_tokens, num_sms)
        splits = 2
        while splits <= max_splits:
            kv = MIN_DENSE_SPLIT_KEYS
            while kv <= pow2_bucket(max_prefix_tokens // splits):
                shapes.add(CudnnShape(splits, num_kv_heads, folded, kv, False))
                kv *= 2
            splits *= 2
    if exact_query_lens and exact_keys <= 0:
        raise ValueError(f"exact graphs need a positive key granule, not {exact_keys}")
    for c in exact_query_lens:
        shapes.add(CudnnShape(1, heads, c, c, True, True))
        for n in range(exact_keys, min(segment_tokens, max_prefix_tokens) + 1, exact_keys):
            shapes.add(CudnnShape(1, num_kv_heads, num_heads_per_kv * c, n, False, True))
    return shapes


def warm_up_cudnn(
    shapes: set[CudnnShape],
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], one layer's (read only)
    v_cache: torch.Tensor,
) -> float:
    """Build every graph of `shapes` by one call each, at the smallest lengths of its buckets
    or at its exact lengths, in the memory layouts of serving (keys of the folded calls are
    views of the cache; the queries of an exact graph in BHSD memory). Returns seconds."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_rows = k_cache.view(-1, num_kv_heads, head_dim)  # [num_slots, Hkv, D]
    v_rows = v_cache.view(-1, num_kv_heads, head_dim)
    torch.cuda.synchronize(k_cache.device)
    t0 = time.perf_counter()
    for shape in sorted(shapes):
        n_q = shape.q_len if shape.exact else shape.q_len // 2 + 1
        n_kv = shape.kv_len if shape.exact else shape.kv_len // 2 + 1
        if shape.batch * n_kv > k_rows.shape[0]:
            raise ValueError(f"the KV cache ({k_rows.shape[0]} slots) cannot hold the warm-up of {shape}")
        q = torch.zeros(shape.batch, n_q, shape.heads, head_dim, dtype=k_cache.dtype, device=k_cache.device)
        q = q.transpose(1, 2).contiguous() if shape.exact else _bshd(q)  # [B, H, n_q, D]
        if shape.causal:  # the own keys: heads repeated, their own memory
            k = torch.zeros(1, n_kv, shape.heads, head_dim, dtype=k_cache.dtype, device=k_cache.device)
            v = k
        else:
            k = k_rows[: shape.batch * n_kv].view(shape.batch, n_kv, num_kv_heads, head_dim)
            v = v_rows[: shape.batch * n_kv].view(shape.batch, n_kv, num_kv_heads, head_dim)
        _cudnn(q, _bshd(k), _bshd(v), shape.causal, head_dim**-0.5)
    torch.cuda.synchronize(k_cache.device)
    return time.perf_counter() - t0
