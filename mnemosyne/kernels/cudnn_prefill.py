"""Long prefill chunks through cuDNN's fused attention (via ATen), which returns the LSE.

A chunk of c queries at positions [q0, q0 + c) of one sequence, whose keys held here
are [kv0, kv_end), splits into two disjoint key sets (merged exactly by `merge.py`):

    keys:     kv0 ............................ q0 ................ q0 + c = kv_end
              |<-------- prefix: seen by every query -------->|<- own keys: causal ->|
    prefix:   no mask; GQA folded into the query length: [1, Hkv, G*c, D] x [1, Hkv, n, D]
              (each query row meets every key of its KV head, so folding is exact)
    own keys: square causal (c x c, top-left = bottom-right alignment), KV heads repeated

A KVP group holding an older piece has kv_end <= q0: prefix only. The prefix is read
in segments of at most `segment_tokens` keys. A segment inside the sequence's leading
run of consecutive blocks (`AttentionMetadata.block_runs_cpu`) is a strided view of the
cache (no copy); any other segment is gathered block by block first.

Two kinds of cuDNN graph serve the calls (PyTorch's `MHA.cpp` picks by the layout):

    ragged   q, k, v in BSHD memory: one graph per power-of-two bucket of lengths serves
             every length (`TORCH_CUDNN_SDPA_AVOID_RECOMPILE` below), at 7-15% less throughput
    exact    q in BHSD memory (k, v still views of the cache): a graph per exact length

A chunk with `exact_keys` = g > 0 (the planner gives it to query lengths whose graphs were
built at start-up: a prefill lane's chunks) takes exact graphs for the keys they can serve
from a fixed set of lengths (`prefix_parts`), the rest ragged::

    keys  |<- segment_tokens ->| ... |<- k g <= segment_tokens ->|<- P mod g ->|<- c, causal ->|
          exact                       exact                        ragged         exact

Measured on an H200 (benchmarks/results/README.md, "Thirtieth session"; one layer, 32 query /
8 KV heads, head dim 128, a 4096-token chunk after 128K / 224K keys): one ragged call over the
prefix ran at 570-576 TFLOP/s, one exact call at 609-642, and this function 561-577 with ragged
graphs only, 598 with exact ones. An exact graph over a length that is not a multiple of the
granule (230000 keys) ran no faster than a ragged one (563).

Only bf16/fp16 on CUDA, without a sliding window, with enough keys (`fits`); everything
else goes to the Triton kernels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from mnemosyne.kernels.merge_attn import merge_attn_states_into

# cuDNN compiles one graph per (query length, key length) by default: ~30 ms each, paid on
# almost every step of a serving workload (chunk lengths vary with the decodes sharing the
# budget; the prefix grows with every chunk). With this opt-in, BSHD-layout inputs go
# through the ragged path and one graph serves all lengths (benchmarks/results/probes).
os.environ.setdefault("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "1")

_aten = torch.ops.aten
MIN_DENSE_SPLIT_KEYS = 4096  # fewest keys of one prefix split (`choose_prefix_splits`)


@dataclass(frozen=True)
class DenseChunk:
    """One sequence of the batch that takes the cuDNN path."""

    seq: int  # index in the batch
    row0: int  # first packed query row
    num_queries: int  # c
    num_prefix: int  # keys [kv0, kv0 + num_prefix) are before every query
    has_own_keys: bool  # keys [q0, q0 + c) are held here too (kv_end == q0 + c)
    run: tuple[int, int]  # (first block id, leading run length in blocks)
    prefix_splits: int = 1  # the prefix's key splits run as one batched call (see split_prefix)
    exact_keys: int = 0  # g > 0: exact graphs for prefix segments of multiples of g keys and
    # the own keys (`prefix_parts`); 0: every call ragged. Only with prefix_splits == 1


def choose_prefix_splits(
    num_queries: int,
    num_heads_per_kv: int,
    num_kv_heads: int,
    num_prefix: int,
    num_sms: int,
    min_split_keys: int = MIN_DENSE_SPLIT_KEYS,
) -> int:
    """Key splits of the prefix so that cuDNN's programs (about one per 128 folded query
    rows per KV head and split) fill two per SM, each split >= min_split_keys keys; a
    power of two (the batch size is part of cuDNN's graph: few distinct ones)."""
    programs = num_kv_heads * -(-num_heads_per_kv * num_queries // 128)
    want = max(1, min(-(-2 * num_sms // programs), num_prefix // min_split_keys))
    return 1 << (want.bit_length() - 1)


def split_prefix_is_batched(chunk: DenseChunk, block_size: int) -> bool:
    """Whether the chunk's prefix splits run as one batched call: they must lie in the
    sequence's leading run of consecutive blocks (a strided view). Otherwise each
    DENSE_SEGMENT_TOKENS segment is its own call, gathered first where it leaves the run,
    with only num_kv_heads * G*c/128 programs: too few to fill the GPU when splits > 1."""
    per = chunk.num_prefix // chunk.prefix_splits
    return chunk.prefix_splits > 1 and -(-chunk.prefix_splits * per // block_size) <= chunk.run[1]


class Part(NamedTuple):
    """One cuDNN call's local keys [k0, k1) of a chunk."""

    k0: int
    k1: int
    causal: bool  # the own keys
    exact: bool  # an exact graph (q in BHSD memory); else the ragged one


def prefix_parts(chunk: DenseChunk, block_size: int, segment_tokens: int) -> list[Part]:
    """The chunk's calls other than a batched split prefix [0, S * per): the prefix's
    segments of at most `segment_tokens` keys (after the batched splits, when
    `split_prefix_is_batched`), then the own keys [num_prefix, num_prefix + c), causal.
    With `exact_keys` = g the first P - P mod g prefix keys and the own keys are exact (the
    module docstring), so an exact prefix segment holds a multiple of g keys, at most
    `segment_tokens`: segment_tokens / g lengths in all."""
    p, g = chunk.num_prefix, chunk.exact_keys
    first = 0
    if split_prefix_is_batched(chunk, block_size):
        first = chunk.prefix_splits * (p // chunk.prefix_splits)
    exact_end = 0
    if g > 0:
        if chunk.prefix_splits != 1 or segment_tokens % g:
            raise ValueError(f"exact keys {g}: need one prefix split and segments of a multiple of it")
        exact_end = p - p % g
    parts = [Part(k0, min(exact_end, k0 + segment_tokens), False, True) for k0 in range(0, exact_end, segment_tokens)]
    start = max(first, exact_end)
    parts += [Part(k0, min(p, k0 + segment_tokens), False, False) for k0 in range(start, p, segment_tokens)]
    if chunk.has_own_keys:
        parts.append(Part(p, p + chunk.num_queries, True, g > 0))
    return parts


def fits_model(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether this path takes a model of this dtype and head dim (cuDNN's fused attention)."""
    return dtype in (torch.bfloat16, torch.float16) and head_dim % 8 == 0 and head_dim <= 128


def fits(
    seq: int,
    row0: int,
    run: tuple[int, int],
    q_len: int,
    q0: int,
    kv0: int,
    kv_len: int,
    dtype: torch.dtype,
    head_dim: int,
    sliding_window: int | None,
    min_queries: int,
    min_keys: int = 0,
) -> DenseChunk | None:
    """Sequence `seq` (rows [row0, row0 + q_len), leading block run `run`) split into
    prefix / own keys, or None when cuDNN cannot take it."""
    if q_len < min_queries or kv_len < min_keys or sliding_window is not None or not fits_model(dtype, head_dim):
        return None
    kv_end = kv0 + kv_len
    if kv_end <= q0:  # an older KVP piece: every key precedes every query
        return DenseChunk(seq, row0, q_len, kv_len, False, run)
    if kv_end == q0 + q_len and kv0 <= q0:
        return DenseChunk(seq, row0, q_len, q0 - kv0, True, run)
    return None


def _bshd(t: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] memory seen as [B, H, S, D]: the layout cuDNN's ragged path takes, so one
    compiled graph serves every sequence length (`TORCH_CUDNN_SDPA_AVOID_RECOMPILE`)."""
    return t.transpose(1, 2)


def _fold(query: torch.Tensor, num_kv_heads: int, exact: bool) -> torch.Tensor:
    """[c, Hkv*G, D] -> [1, Hkv, G*c, D] (row g*c + i is query i of head kv*G + g), a copy in
    BSHD memory for the ragged graphs or BHSD for the exact ones."""
    c, num_heads, d = query.shape
    q = query.view(c, num_kv_heads, num_heads // num_kv_heads, d)
    if exact:
        return q.permute(1, 2, 0, 3).reshape(1, num_kv_heads, num_heads // num_kv_heads * c, d)
    return _bshd(q.permute(2, 0, 1, 3).reshape(1, num_heads // num_kv_heads * c, num_kv_heads, d))


def _unfold(o: torch.Tensor, s: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's folded out [1, Hkv, G*c, D], lse [1, Hkv, G*c] -> [c, H, D], [c, H] (a view
    where the memory allows: an exact graph's BHSD output)."""
    num_kv_heads, rows, d = o.shape[1:]
    group = rows // c
    o = o[0].unflatten(1, (group, c)).permute(2, 0, 1, 3).reshape(c, num_kv_heads * group, d)
    s = s[0].unflatten(1, (group, c)).permute(2, 0, 1).reshape(c, num_kv_heads * group)
    return o, s


def _keys(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [max_blocks] int32, this sequence's row
    run: tuple[int, int],
    start: int,
    end: int,
) -> torch.Tensor:
    """Keys (or values) with local indices [start, end): [1, num_kv_heads, end - start, head_dim]."""
    bs, hkv, d = cache.shape[1], cache.shape[2], cache.shape[3]
    b_lo, b_hi = start // bs, -(-end // bs)
    b0, n_run = run
    if b_hi <= n_run:  # consecutive blocks: a strided view
        blocks = cache[b0 + b_lo : b0 + b_hi]
    else:
        blocks = cache.index_select(0, block_table[b_lo:b_hi].long())
    flat = blocks.view(-1, hkv, d)[start - b_lo * bs : end - b_lo * bs]  # [n, Hkv, D]
    return _bshd(flat.unsqueeze(0))  # [1, Hkv, n, D]


def _cudnn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, H, nq, D] x [1, H, nk, D] -> out [1, H, nq, D], lse [1, H, nq] float32 (natural log)."""
    res = _aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    lse = res[1]
    if lse.dim() == 4:  # [B, H, S, 1]
        lse = lse.squeeze(-1)
    assert lse.shape == q.shape[:3], (lse.shape, q.shape)
    return res[0], lse


def _split_prefix(
    q_fold: torch.Tensor,  # [1, Hkv, G*c, D] (BSHD memory)
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    b0: int,  # first block of the run holding keys [0, num_splits * per)
    num_splits: int,
    per: int,  # keys per split
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix keys [0, num_splits * per) of a run of consecutive blocks as one batched
    cuDNN call, batch = split (a strided view, no copy; the folded queries repeated per
    split), merged exactly over the splits: out [1, Hkv, G*c, D] float32, lse [1, Hkv, G*c]::

        keys  |<- split 0: per ->|<- split 1: per ->| ... |<- split S-1 ->|
        m = max_s lse_s,  w_s = exp(lse_s - m),  out = sum w_s out_s / sum w_s,  lse = m + log sum w_s
    """
    bs, hkv, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    n = num_splits * per
    nb = -(-n // bs)
    k = _bshd(k_cache[b0 : b0 + nb].view(-1, hkv, d)[:n].view(num_splits, per, hkv, d))  # [S, Hkv, per, D]
    v = _bshd(v_cache[b0 : b0 + nb].view(-1, hkv, d)[:n].view(num_splits, per, hkv, d))
    q = _bshd(q_fold.transpose(1, 2).expand(num_splits, -1, -1, -1).contiguous())  # [S, Hkv, G*c, D]
    o, lse = _cudnn(q, k, v, False, scale)  # [S, Hkv, G*c, D], [S, Hkv, G*c]
    m = lse.amax(0, keepdim=True)  # every split holds >= 1 key: finite
    w = torch.exp(lse - m)  # [S, Hkv, G*c]
    total = w.sum(0, keepdim=True)
    out = (w.unsqueeze(-1) * o.float()).sum(0, keepdim=True) / total.unsqueeze(-1)
    return out, m + torch.log(total)


def _repeat_heads(kv: torch.Tensor, num_heads_per_kv: int) -> torch.Tensor:
    """[1, Hkv, n, D] -> [1, Hkv*G, n, D] in BSHD memory (head kv*G + g reads KV head kv)."""
    return _bshd(kv.transpose(1, 2).repeat_interleave(num_heads_per_kv, dim=2))


def dense_chunk_attention(
    query: torch.Tensor,  # [c, num_heads, head_dim], this chunk's rows
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [max_blocks] int32, this sequence's row of the block table
    chunk: DenseChunk,
    scale: float,
    segment_tokens: int,
    out: torch.Tensor,  # [c, num_heads, head_dim] query dtype, written
    lse: torch.Tensor,  # [c, num_heads] float32, written
) -> None:
    """Exact attention of one chunk into (out, lse). The partials (prefix segments, then the
    own keys) are merged by one fused kernel each into a float32 accumulator; the last merge
    writes `out` directly."""
    c, num_heads, d = query.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    num_heads_per_kv = num_heads // hkv
    splits = chunk.prefix_splits
    per = chunk.num_prefix // splits
    batched = split_prefix_is_batched(chunk, bs)
    parts = prefix_parts(chunk, bs, segment_tokens)
    if batched:
        parts.insert(0, Part(0, splits * per, False, False))
    if not parts:  # no key at all
        out.zero_()
        lse.fill_(float("-inf"))
        return
    q_folds: dict[bool, torch.Tensor] = {}  # by exact: the folded queries in each layout asked for

    def folded(exact: bool) -> torch.Tensor:
        if exact not in q_folds:
            q_folds[exact] = _fold(query, hkv, exact)
        return q_folds[exact]

    acc: tuple[torch.Tensor, torch.Tensor] | None = None
    for n, (k0, k1, causal, exact) in enumerate(parts):
        if batched and n == 0:
            o, s = _unfold(*_split_prefix(folded(False), k_cache, v_cache, chunk.run[0], splits, per, scale), c)
            acc = (o, s)  # float32
            if len(parts) == 1:
                out.copy_(o)
                lse.copy_(s)
            continue
        k = _keys(k_cache, block_table, chunk.run, k0, k1)  # [1, Hkv, n, D]
        v = _keys(v_cache, block_table, chunk.run, k0, k1)
        if causal:  # the own keys: square causal, KV heads repeated for the query heads
            k, v = _repeat_heads(k, num_heads_per_kv), _repeat_heads(v, num_heads_per_kv)
            q = query.transpose(0, 1).contiguous().unsqueeze(0) if exact else _bshd(query.contiguous().unsqueeze(0))
            o, s = _cudnn(q, k, v, True, scale)  # q: [1, H, c, D] in BHSD (exact) / BSHD (ragged) memory
            o, s = o[0].transpose(0, 1), s[0].transpose(0, 1)  # [c, H, D], [c, H] (views)
        else:
            o, s = _unfold(*_cudnn(folded(exact), k, v, False, scale), c)  # [1, Hkv, G*c, D], [1, Hkv, G*c]
        if acc is None:  # the first partial
            if n == len(parts) - 1:
                out.copy_(o)
                lse.copy_(s)
            acc = (o, s)
        elif n == len(parts) - 1:  # the last merge writes the result
            merge_attn_states_into(out, lse, acc[0], acc[1], o, s)
        else:
            dst = acc if acc[0].dtype == torch.float32 else (
                torch.empty(c, num_heads, d, dtype=torch.float32, device=query.device),
                torch.empty(c, num_heads, dtype=torch.float32, device=query.device),
            )  # fmt: skip
            merge_attn_states_into(dst[0], dst[1], acc[0], acc[1], o, s)
            acc = dst


def warm_up_merges(num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """Compile every `merge_attn_states_into` variant `dense_chunk_attention` launches, so that
    serving never waits for it: the variants differ only in dtypes (strides and alignment
    are not specialized on). The partial merged in (`out_b`) is always cuDNN's, in the model
    dtype; the accumulator (`out_a`) is the first partial (model dtype) or float32 (the
    split prefix, or an earlier merge); the output is the model-dtype result (last merge)
    or a float32 accumulator. LSEs are float32 throughout."""
    lse = torch.zeros(1, num_heads, dtype=torch.float32, device=device)
    out_b = torch.zeros(1, num_heads, head_dim, dtype=dtype, device=device)
    for out_dtype in {dtype, torch.float32}:
        for acc_dtype in {dtype, torch.float32}:
            out = torch.zeros(1, num_heads, head_dim, dtype=out_dtype, device=device)
            acc = torch.zeros(1, num_heads, head_dim, dtype=acc_dtype, device=device)
            merge_attn_states_into(out, lse.clone(), acc, lse, out_b, lse)
